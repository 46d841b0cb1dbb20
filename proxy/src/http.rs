//! HTTP/1.1: head parsing, body framing, rewriting, and the proxying connection loop.

pub mod access_log;
pub mod body;
pub mod chunked;
pub mod client_ip;
pub mod connection;
pub mod exchange;
pub mod gate;
pub mod head;
pub mod redirect;
pub mod responses;
pub mod rewrite;
