//! Request and response heads from the network: parsing must never panic, and a head it accepts
//! must have consistent framing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::http::head::{Framing, RequestHead, ResponseHead};

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    if let Ok(Some(len)) = head.parse(data) {
        assert!(len <= data.len());
        let _ = head.path();
        let _ = head.host_header();
        assert!(!matches!(head.framing, Framing::UntilClose));
    }
    let mut resp = ResponseHead::default();
    let _ = resp.parse(data, data.first().is_some_and(|b| b & 1 == 1));
});
