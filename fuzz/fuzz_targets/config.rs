//! Any configuration text, as YAML and as JSON: loading returns a configuration or
//! errors with key paths, never panics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mikkoo::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |name: &str| (name == "SET").then(|| "value".to_owned());
    let _ = Config::from_text(Path::new("fuzz.yaml"), text, &env);
    let _ = Config::from_text(Path::new("fuzz.json"), text, &env);
});
