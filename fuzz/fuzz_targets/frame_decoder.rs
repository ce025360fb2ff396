//! Arbitrary bytes into the message framer, read in arbitrary chunk sizes: it must return whole
//! messages or an error, never panic, never allocate past the cap; and every whole message into
//! every typed view pgward reads (frontend and backend), which must decode it or refuse it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgward::protocol::fields::{password_text, ErrorFields};
use pgward::protocol::view::{command_tag, data_row, row_description, Frontend};
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
                let _ = password_text(body);
                if let Ok(Frontend::Bind(bind)) = Frontend::decode(&message) {
                    // Every format lookup stays in bounds, whatever the counts said.
                    for i in 0..bind.values.len() + 2 {
                        let _ = bind.format_of(i);
                    }
                }
                let _ = row_description(body);
                let _ = data_row(body);
                let _ = command_tag(body);
            }
        }
    });
});
