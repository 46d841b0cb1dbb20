//! An owned read buffer with a cursor. Reads go straight into its spare capacity (the buffer is
//! lent to the kernel and handed back, io_uring style); bytes already read are written out of it
//! without copying.

use std::io;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

/// Smallest free space offered to one read.
pub const MIN_READ: usize = 16 * 1024;
/// Free space offered to the first read of a request on an empty buffer: most request heads
/// fit, and an idle keep-alive connection does not pin a large buffer while it waits.
pub const FIRST_READ: usize = 2 * 1024;

#[derive(Debug, Default)]
pub struct InBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl InBuf {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
            pos: 0,
        }
    }

    /// Bytes read but not consumed yet.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Gives the memory back when nothing is buffered (an idle connection keeps none).
    pub fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }

    /// Reads once, appending to the unconsumed bytes; `Ok(0)` is end of stream. The buffer grows
    /// only while unconsumed data fills it, which the callers bound (head size, body chunks).
    pub async fn fill<S: AsyncReadRent>(&mut self, io: &mut S) -> io::Result<usize> {
        self.fill_at_least(io, MIN_READ).await
    }

    /// Like `fill`, offering at least `min_free` bytes of space to the read.
    pub async fn fill_at_least<S: AsyncReadRent>(
        &mut self,
        io: &mut S,
        min_free: usize,
    ) -> io::Result<usize> {
        if self.pos > 0 && self.buf.capacity() - self.buf.len() < min_free {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < min_free {
            self.buf.reserve(min_free);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = io.read(buf.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Writes the first `n` unconsumed bytes to `dst` and consumes them.
    pub async fn write_to<W: AsyncWriteRent>(&mut self, dst: &mut W, n: usize) -> io::Result<()> {
        let n = n.min(self.buf.len() - self.pos);
        if n == 0 {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = dst.write_all(buf.slice(self.pos..self.pos + n)).await;
        self.buf = slice.into_inner();
        res?;
        self.consume(n);
        Ok(())
    }
}

/// Writes a whole owned buffer and hands it back for reuse.
pub async fn write_vec<W: AsyncWriteRent>(dst: &mut W, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let (res, buf) = dst.write_all(buf).await;
    (res.map(|_| ()), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::BufResult;
    use monoio::buf::IoVecBuf;

    struct Sink(Vec<u8>);

    impl AsyncWriteRent for Sink {
        async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            // SAFETY: IoBuf guarantees read_ptr is valid for bytes_init bytes.
            let s = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            self.0.extend_from_slice(s);
            (Ok(s.len()), buf)
        }
        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            (Ok(0), buf)
        }
        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[monoio::test]
    async fn fill_appends_and_write_to_consumes() {
        let mut src: &[u8] = b"hello world";
        let mut b = InBuf::with_capacity(4);
        let n = b.fill(&mut src).await.unwrap();
        assert_eq!(n, 11);
        assert_eq!(b.data(), b"hello world");
        let mut out = Sink(Vec::new());
        b.write_to(&mut out, 5).await.unwrap();
        assert_eq!(out.0, b"hello");
        assert_eq!(b.data(), b" world");
        assert_eq!(b.fill(&mut src).await.unwrap(), 0);
    }
}
