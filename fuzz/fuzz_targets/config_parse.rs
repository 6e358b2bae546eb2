//! Any configuration file: settings or an error naming what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = marmot_daemon::config::Settings::parse(std::path::Path::new("fuzz.toml"), &text);
});
