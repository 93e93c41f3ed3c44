//! Arbitrary resource bytes → the xDS conversion: the demo's resources with one of them
//! replaced by whatever the bytes decode to; the conversion never panics, its errors say
//! something, and what it accepts validates or is refused with reasons.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use remora::config::xds::{from_envoy, to_envoy};
use remora_xds::Resources;

fn demo() -> &'static Resources {
    static DEMO: OnceLock<Resources> = OnceLock::new();
    DEMO.get_or_init(|| {
        let text = remora::demo::DEMO_CONFIG
            .replace("{{V1_PORT}}", "18081")
            .replace("{{V2_PORT}}", "18082");
        to_envoy(&remora::config::parse(&text, "demo.yaml").expect("demo config"))
    })
}

// Input: a selector byte (which kind of resource), then the resource's protobuf bytes.
fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let mut res = demo().clone();
    let replaced = match which % 4 {
        0 => Message::decode(bytes).map(|m| res.listeners[0] = m).is_ok(),
        1 => Message::decode(bytes)
            .map(|m| res.route_configs[0] = m)
            .is_ok(),
        2 => Message::decode(bytes).map(|m| res.clusters[0] = m).is_ok(),
        _ => match res.endpoints.first_mut() {
            Some(slot) => Message::decode(bytes).map(|m| *slot = m).is_ok(),
            None => false,
        },
    };
    if !replaced {
        return;
    }
    match from_envoy(&res) {
        Ok(dynamic) => {
            // The accepted resources meet the same validation as a file.
            if let Err(errors) = remora::config::parse_with("{}", "<fuzz>", Some(&dynamic)) {
                assert!(errors.0.iter().all(|e| !e.message.trim().is_empty()));
            }
        }
        Err(errors) => assert!(errors.iter().all(|e| !e.trim().is_empty())),
    }
});
