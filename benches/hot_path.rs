//! Criterion benchmarks of the per-message hot path: framing pipelined client batches,
//! walking a batch's messages, and reading the fields of an ErrorResponse.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgward::protocol::build;
use pgward::protocol::fields::ErrorFields;
use pgward::protocol::FrameReader;

/// A pgbench -M prepared transaction as the client sends it: Bind, Execute, Sync.
fn prepared_batch(count: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..count {
        let mut bind = BytesMut::new();
        let value = (i % 100_000).to_string();
        postgres_protocol::message::frontend::bind(
            "",
            "P0_1",
            [1i16],
            [value.as_str()],
            |v, out| {
                out.extend_from_slice(v.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [1i16],
            &mut bind,
        )
        .map_err(|_| ())
        .expect("bind");
        wire.extend_from_slice(&bind);
        let mut rest = BytesMut::new();
        postgres_protocol::message::frontend::execute("", 0, &mut rest).expect("execute");
        postgres_protocol::message::frontend::sync(&mut rest);
        wire.extend_from_slice(&rest);
    }
    wire
}

/// A DataRow-heavy server response: 100 rows of two columns and a CommandComplete.
fn result_set() -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..100u32 {
        let a = i.to_string();
        let b = "x".repeat(64);
        let body_len = 2 + 4 + a.len() + 4 + b.len();
        wire.push(b'D');
        wire.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
        wire.extend_from_slice(&2i16.to_be_bytes());
        for col in [a.as_bytes(), b.as_bytes()] {
            wire.extend_from_slice(&(col.len() as i32).to_be_bytes());
            wire.extend_from_slice(col);
        }
    }
    wire.extend_from_slice(b"C\0\0\0\x0dSELECT 100\0");
    wire.extend_from_slice(&build::ready_for_query(b'I'));
    wire
}

fn framing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("framing");
    for (name, wire) in [
        ("prepared_tx_x64", prepared_batch(64)),
        ("result_set_100_rows", result_set()),
    ] {
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || wire.clone(),
                |wire| {
                    runtime.block_on(async {
                        let mut reader = FrameReader::new(&wire[..], 1 << 20);
                        let mut tags = 0usize;
                        while let Ok(Some(batch)) = reader.next_batch().await {
                            for message in batch.messages() {
                                tags += usize::from(message.tag());
                            }
                        }
                        black_box(tags)
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn error_fields(c: &mut Criterion) {
    let raw = build::error_response(
        build::Severity::Error,
        "42501",
        "pgward: service \"support\" may not read column customers.ssn",
        None,
        None,
    );
    let body = &raw[5..];
    c.bench_function("error_fields_parse", |b| {
        b.iter(|| black_box(ErrorFields::parse(black_box(body))))
    });
}

criterion_group!(benches, framing, error_fields);
criterion_main!(benches);
