//! Mappings files: any text either loads into mappings that build a route table, or is refused
//! with an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::mappings_file::parse_str;
use portcullis::routes::RouteTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mappings) = parse_str(text, "fuzz") {
        let (table, report) = RouteTable::build(&mappings, &RouteTable::default(), &[]);
        assert!(report.skipped.is_empty(), "a validated file must build cleanly");
        assert_eq!(table.len(), mappings.len());
    }
});
