//! Any bytes from the stream: decoding the message, unsealing its body (zstd included) and
//! reading every item gives values or errors, never a panic, and never unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marmot_core::wire::{BodyReader, decode_message, unseal};

fuzz_target!(|data: &[u8]| {
    // As a whole message.
    if let Ok((header, fragment)) = decode_message(data)
        && let Ok(body) = unseal(&header, bytes::Bytes::copy_from_slice(fragment))
    {
        read_all(&body);
    }
    // As a body straight away (what a reassembled, uncompressed batch is).
    read_all(data);
});

fn read_all(body: &[u8]) {
    let mut reader = BodyReader::new(body);
    let mut values = Vec::new();
    while let Ok(Some(_)) = reader.next_item(&mut values) {}
}
