//! Chunked bodies from the network, fed in arbitrary pieces: never a panic, and the split points
//! never change the outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::chunked::ChunkedDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let mut whole = ChunkedDecoder::new();
    let whole_result = whole.feed(body);
    let mut pieces = ChunkedDecoder::new();
    let step = usize::from(split).max(1);
    let mut consumed = 0;
    let mut failed = false;
    for piece in body.chunks(step) {
        match pieces.feed(piece) {
            Ok(n) => {
                consumed += n;
                if pieces.is_done() {
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match whole_result {
        Ok(n) if whole.is_done() => assert!(!failed && pieces.is_done() && consumed == n),
        Ok(_) => assert!(!failed && !pieces.is_done()),
        Err(_) => assert!(failed),
    }
});
