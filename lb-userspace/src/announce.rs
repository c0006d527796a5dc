//! VIP announcement for several LB nodes behind ECMP. Each VIP that can take new flows gets a
//! /32 (IPv6: /128) route in a kernel routing table of the operator's choice (`agent.announce_table`); a
//! routing daemon on the node (BIRD's `kernel` protocol with `learn`, FRR's `redistribute
//! table`) advertises those routes to the routers. The route goes when no backend of the VIP
//! is up and when the agent stops, so the routers move the VIP's flows to the other nodes.
//! The table is only announced from, never used for forwarding.
use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;
use tracing::{info, warn};

use crate::{iproute::ip, reconcile::AppliedView, state::DesiredState};

/// VIPs with at least one service whose ring has a backend.
pub fn serving_vips(desired: &DesiredState, applied: &[AppliedView]) -> BTreeSet<IpAddr> {
    applied
        .iter()
        .filter(|a| a.table_size > 0)
        .filter_map(|a| desired.services.get(&a.name).map(|s| s.vip))
        .collect()
}

pub struct Announcer {
    table: u32,
    announced: BTreeSet<IpAddr>,
}

impl Announcer {
    /// Takes over what an earlier agent left in the table.
    pub fn new(table: u32) -> Self {
        // A table with no route yet does not exist: nothing to take over.
        let table_name = table.to_string();
        let announced = ["-4", "-6"]
            .into_iter()
            .flat_map(|family| {
                let text = ip(&[
                    family,
                    "-j",
                    "route",
                    "show",
                    "table",
                    &table_name,
                    "proto",
                    "static",
                ])
                .unwrap_or_default();
                let routes: Vec<serde_json::Value> =
                    serde_json::from_str(&text).unwrap_or_default();
                routes
                    .iter()
                    .filter_map(|r| r["dst"].as_str()?.parse().ok())
                    .collect::<Vec<IpAddr>>()
            })
            .collect();
        Self { table, announced }
    }

    /// Announces exactly `vips`.
    pub fn sync(&mut self, vips: &BTreeSet<IpAddr>) {
        for vip in self.announced.clone().difference(vips) {
            match self.route("del", *vip) {
                Ok(()) => info!(%vip, table = self.table, "VIP withdrawn: no backend up"),
                Err(e) => warn!(%vip, "withdrawing the VIP: {e:#}"),
            }
            self.announced.remove(vip);
        }
        for vip in vips.difference(&self.announced.clone()) {
            match self.route("replace", *vip) {
                Ok(()) => {
                    info!(%vip, table = self.table, "VIP announced");
                    self.announced.insert(*vip);
                }
                Err(e) => warn!(%vip, "announcing the VIP: {e:#}"),
            }
        }
    }

    /// Withdraws every VIP (the agent is stopping).
    pub fn withdraw_all(&mut self) {
        self.sync(&BTreeSet::new());
    }

    fn route(&self, action: &str, vip: IpAddr) -> Result<()> {
        let prefix = if vip.is_ipv4() { "/32" } else { "/128" };
        let table = self.table.to_string();
        let dst = format!("{vip}{prefix}");
        ip(&[
            "route", action, &dst, "dev", "lo", "table", &table, "proto", "static",
        ])
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        reconcile::{AppliedBackend, AppliedView},
    };
    use std::path::Path;

    #[test]
    fn a_vip_is_served_while_any_of_its_services_has_a_ring() {
        let text = "[agent]\ninterfaces = [\"eth0\"]\n\
            [[service]]\nname = \"web\"\nvip = \"10.99.100.1\"\nport = 80\n\
            [[service]]\nname = \"dns\"\nvip = \"10.99.100.1\"\nport = 53\nprotocol = \"udp\"\n\
            [[service]]\nname = \"api\"\nvip = \"10.99.100.2\"\nport = 80\n";
        let config = Config::parse(Path::new("t.toml"), text).unwrap();
        let desired = DesiredState::from_config(&config);
        let view = |name: &str, table_size| AppliedView {
            name: name.into(),
            id: 0,
            table_size,
            ring_rebuilds: 0,
            backends: std::collections::BTreeMap::<_, AppliedBackend>::new(),
            problem: None,
        };
        let vips = serving_vips(&desired, &[view("web", 0), view("dns", 7), view("api", 0)]);
        assert_eq!(vips, ["10.99.100.1".parse().unwrap()].into());
        assert!(serving_vips(&desired, &[view("web", 0), view("api", 0)]).is_empty());
    }
}
