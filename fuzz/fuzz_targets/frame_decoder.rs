//! Arbitrary bytes into the message framer, read in arbitrary chunk sizes: it must return whole
//! messages or an error, never panic, never allocate past the cap.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgward::protocol::fields::{parse_name_and_text, password_text, query_text, ErrorFields};
use pgward::protocol::FrameReader;

fuzz_target!(|data: &[u8]| {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(_) => return,
    };
    runtime.block_on(async {
        let mut reader = FrameReader::new(data, 1 << 16);
        while let Ok(Some(batch)) = reader.next_batch().await {
            for message in batch.messages() {
                let body = message.body();
                let _ = ErrorFields::parse(body);
                let _ = query_text(body);
                let _ = parse_name_and_text(body);
                let _ = password_text(body);
            }
        }
    });
});
