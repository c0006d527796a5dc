//! Container labels -> `labels::parse` -> `ContainerInfo::target`, as discovery runs them
//! on what any user who may start containers writes. Input: a container id line, then
//! `key=value` lines (keys get the `xlb.` prefix unless they start with `!`).
#![no_main]
use std::{collections::BTreeMap, net::IpAddr};

use libfuzzer_sys::fuzz_target;
use xlb::{
    config::{HealthConfig, Protocol},
    discovery::labels::{self, ContainerInfo, NetworkInfo},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let id = lines.next().unwrap_or_default().to_string();
    let mut map = BTreeMap::new();
    for line in lines {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        let key = match k.strip_prefix('!') {
            Some(raw) => raw.to_string(),
            None => format!("xlb.{k}"),
        };
        map.insert(key, v.to_string());
    }
    let net = |name: &str, ip: &str, ip6: &str| NetworkInfo {
        name: name.into(),
        ip: ip.parse::<IpAddr>().ok(),
        ip6: ip6.parse::<IpAddr>().ok(),
        bridge: Some(format!("br-{name}")),
    };
    let c = ContainerInfo {
        id,
        name: "fuzz".into(),
        labels: map,
        networks: vec![
            net("front", "10.99.2.11", "fd99:2::11"),
            net("back", "10.99.3.11", ""),
            net("none", "", ""),
        ],
        exposed: vec![
            (80, Protocol::Tcp),
            (53, Protocol::Udp),
            (8080, Protocol::Tcp),
        ],
        health: None,
        stopping: false,
        created: None,
    };
    let owner = c.owner();
    match labels::parse(&owner, &c.labels, "xlb") {
        Ok(Some(spec)) => {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                for v6 in [false, true] {
                    let _ = c.target(&spec, "xlb", proto, v6);
                }
            }
            let _ = HealthConfig::default().with(&spec.health);
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
