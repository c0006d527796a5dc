//! Config text -> `Config::parse` (TOML, then validation) -> the desired state. Nothing may
//! panic; every error is one line per problem; a valid config written back parses again.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xlb::{config::Config, state::DesiredState};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.toml"), text) {
        Err(errors) => {
            let shown = errors.to_string();
            assert_eq!(shown.lines().count(), errors.0.len(), "{shown}");
        }
        Ok(config) => {
            let _ = DesiredState::from_config(&config);
            let _ = config.api_listen();
            let again = toml::to_string(&config).expect("a parsed config serializes");
            Config::parse(Path::new("again.toml"), &again)
                .unwrap_or_else(|e| panic!("written back, it no longer parses:\n{e}\n{again}"));
        }
    }
});
