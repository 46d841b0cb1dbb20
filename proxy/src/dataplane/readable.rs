//! Waiting for a client's next bytes without lending the kernel a buffer, so an idle
//! keep-alive connection holds no read buffer.

use std::io;

use monoio::net::TcpStream;

/// A client stream that can wait until a read would find data.
#[allow(async_fn_in_trait)] // used on one thread only; no Send bound is wanted
pub trait WaitReadable {
    async fn wait_readable(&mut self) -> io::Result<()>;
}

impl WaitReadable for TcpStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        self.readable(false).await
    }
}
