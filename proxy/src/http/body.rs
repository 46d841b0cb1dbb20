//! Streams a message body from one side to the other without buffering it whole.
//!
//! Bytes flow through the reader's `InBuf`: whatever the head parser left there is the start of
//! the body, and whatever remains after the body belongs to the next message.

use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRent};

use super::chunked::{ChunkError, ChunkedDecoder};
use super::head::Framing;
use crate::dataplane::inbuf::InBuf;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the body: {0}")]
    Read(std::io::Error),
    #[error("the sender closed before the body was complete")]
    Truncated,
    #[error("the sender stalled for longer than the idle timeout")]
    ReadTimeout,
    #[error("writing the body: {0}")]
    Write(std::io::Error),
    #[error("the receiver stalled for longer than the idle timeout")]
    WriteTimeout,
    #[error("bad chunked framing: {0}")]
    Chunked(#[from] ChunkError),
}

impl BodyError {
    /// True when the side being read from is at fault.
    pub fn is_sender_fault(&self) -> bool {
        matches!(
            self,
            Self::Read(_) | Self::Truncated | Self::ReadTimeout | Self::Chunked(_)
        )
    }
}

/// How a body is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Byte for byte, framing included.
    AsIs,
    /// Chunk payload only, for a receiver that cannot take chunked framing (an HTTP/1.0
    /// client); the connection then ends the body.
    Dechunked,
}

/// Copies one body; returns the number of bytes written.
pub async fn copy<R, W>(
    src: &mut R,
    buf: &mut InBuf,
    dst: &mut W,
    framing: Framing,
    idle: Duration,
) -> Result<u64, BodyError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    copy_as(src, buf, dst, framing, Output::AsIs, idle).await
}

/// `copy`, choosing how chunked bodies are written.
pub async fn copy_as<R, W>(
    src: &mut R,
    buf: &mut InBuf,
    dst: &mut W,
    framing: Framing,
    output: Output,
    idle: Duration,
) -> Result<u64, BodyError>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let mut moved = 0u64;
    match framing {
        Framing::None => {}
        Framing::Length(mut remaining) => {
            while remaining > 0 {
                if buf.is_empty() && read_some(src, buf, idle).await? == 0 {
                    return Err(BodyError::Truncated);
                }
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.data().len());
                write_some(dst, buf, n, idle).await?;
                remaining -= n as u64;
                moved += n as u64;
            }
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
            while !decoder.is_done() {
                if buf.is_empty() && read_some(src, buf, idle).await? == 0 {
                    return Err(BodyError::Truncated);
                }
                if output == Output::AsIs {
                    let n = decoder.feed(buf.data())?;
                    write_some(dst, buf, n, idle).await?;
                    moved += n as u64;
                    continue;
                }
                runs.clear();
                let n = decoder.feed_with(buf.data(), |r| runs.push(r))?;
                let mut cursor = 0;
                for run in &runs {
                    buf.consume(run.start - cursor);
                    write_some(dst, buf, run.len(), idle).await?;
                    moved += run.len() as u64;
                    cursor = run.end;
                }
                buf.consume(n - cursor);
            }
        }
        Framing::UntilClose => loop {
            if buf.is_empty() && read_some(src, buf, idle).await? == 0 {
                break;
            }
            let n = buf.data().len();
            write_some(dst, buf, n, idle).await?;
            moved += n as u64;
        },
    }
    Ok(moved)
}

async fn read_some<R: AsyncReadRent>(
    src: &mut R,
    buf: &mut InBuf,
    idle: Duration,
) -> Result<usize, BodyError> {
    match monoio::time::timeout(idle, buf.fill(src)).await {
        Err(_) => Err(BodyError::ReadTimeout),
        Ok(r) => r.map_err(BodyError::Read),
    }
}

async fn write_some<W: AsyncWriteRent>(
    dst: &mut W,
    buf: &mut InBuf,
    n: usize,
    idle: Duration,
) -> Result<(), BodyError> {
    match monoio::time::timeout(idle, buf.write_to(dst, n)).await {
        Err(_) => Err(BodyError::WriteTimeout),
        Ok(r) => r.map_err(BodyError::Write),
    }
}
