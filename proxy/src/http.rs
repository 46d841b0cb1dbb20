//! HTTP/1.1: head parsing, body framing, rewriting, and the proxying connection loop.

pub mod body;
pub mod chunked;
pub mod connection;
pub mod exchange;
pub mod head;
pub mod redirect;
pub mod responses;
pub mod rewrite;
