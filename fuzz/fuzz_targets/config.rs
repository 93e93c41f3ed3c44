//! Config bytes → parse, validate, compile: never a panic; every error names the file and
//! says something; what is accepted compiles and survives the xDS round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remora::config::compile::{compile, Origin};
use remora::config::xds::{from_envoy, to_envoy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match remora::config::parse(text, "fuzz.yaml") {
        Ok(raw) => {
            from_envoy(&to_envoy(&raw)).expect("a valid config survives the xDS round trip");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _entered = runtime.enter();
            let origin = Origin {
                version: 1,
                source: "fuzz".into(),
                hash: String::new(),
                written: remora::config::Written::text(text),
            };
            compile(raw, origin, &remora::metrics::Metrics::new(), None);
        }
        Err(errors) => {
            for e in &errors.0 {
                assert_eq!(e.file, "fuzz.yaml");
                assert!(!e.message.trim().is_empty());
            }
        }
    }
    remora::config::direct_and_tree_agree(text).expect("both deserializations agree");
});
