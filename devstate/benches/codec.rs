//! Encode and decode of a stream with 4,096 connector-like sections.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devstate::{Item, StreamReader, StreamWriter};
use machine_types::MachineType;
use std::hint::black_box;

const SECTIONS: u32 = 4096;

fn encode(m: &'static MachineType) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::with_capacity(256 << 10), m, "bench").unwrap();
    w.config(&mut Config {
        vcpus: 1,
        memory_mib: 64,
    })
    .unwrap();
    for i in 0..SECTIONS {
        w.section(&mut conn(i), i).unwrap();
    }
    w.section(&mut Cpu::default(), 0).unwrap();
    w.finish().unwrap()
}

fn decode(bytes: &[u8]) -> usize {
    let cat = catalog();
    let mut r = StreamReader::new(bytes, Some(&cat)).unwrap();
    let mut n = 0;
    loop {
        match r.next_item().unwrap() {
            Item::Section(s) if s.name == "conn" => {
                black_box(s.load::<Conn>().unwrap());
                n += 1;
            }
            Item::End => return n,
            _ => {}
        }
    }
}

fn bench(c: &mut Criterion) {
    let m = MachineType::lookup("ferry-2.0").unwrap();
    let bytes = encode(m);
    println!(
        "stream with {SECTIONS} connector sections: {} bytes",
        bytes.len()
    );
    let mut g = c.benchmark_group("codec-4096-sections");
    g.throughput(Throughput::Elements(u64::from(SECTIONS)));
    g.bench_function("encode", |b| b.iter(|| black_box(encode(m))));
    g.bench_function("decode", |b| {
        b.iter(|| assert_eq!(decode(black_box(&bytes)), SECTIONS as usize))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
