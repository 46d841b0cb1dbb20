//! Copying one direction of a byte stream in user space.

use std::sync::atomic::{AtomicU64, Ordering};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

/// Copies from `src` to `dst` (after `pending`, bytes already read) until `src` ends or either
/// side fails; every chunk is added to `counter` when one is given. Returns the bytes taken
/// from `src` (with `pending`).
pub async fn pump<R: AsyncReadRent, W: AsyncWriteRent>(
    src: &mut R,
    dst: &mut W,
    pending: Vec<u8>,
    counter: Option<&AtomicU64>,
) -> u64 {
    let mut moved = pending.len() as u64;
    if !pending.is_empty() && dst.write_all(pending).await.0.is_err() {
        return 0;
    }
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let (res, b) = src.read(buf).await;
        buf = b;
        match res {
            // A spliced socket's read can wake for bytes the kernel then took for the splice.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
            Ok(0) | Err(_) => return moved,
            Ok(n) => {
                moved += n as u64;
                if let Some(c) = counter {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let (res, b) = dst.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return moved;
        }
        buf.clear();
    }
}
