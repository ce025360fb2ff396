//! Arbitrary bytes as what a listed load balancer sends first (a PROXY protocol header, v1 or
//! v2): no panic, and never more read than a header can hold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgward::protocol::proxy_header::{parse_v1, parse_v2, read_source};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut rest = data;
    let _ = runtime.block_on(read_source(&mut rest));
    assert!(data.len() - rest.len() <= 16 + 4096);
    let _ = parse_v1(data);
    if let Some((head, body)) = data.split_first_chunk::<16>() {
        let _ = parse_v2(head, body);
    }
});
