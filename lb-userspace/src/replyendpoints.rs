//! The data path's `REPLY_ENDPOINTS` (lb-ebpf/src/replies.rs): a backend endpoint (address,
//! port, protocol) claimed by the backend id whose new nat flows' replies find them through
//! it. The data path writes a claim once and never changes it; the sweep removes a claim whose
//! backend id no longer holds that endpoint (the backend was removed, or its id reused), so
//! the endpoint's next backend can claim it. Until then that backend's new flows each take a
//! reply mapping of their own, as every flow did before.
use std::path::Path;

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData};
use lb_common::{BACKEND_IN_USE, Backend, DoubleBuffer, VipKey};

use crate::datapath::{BACKENDS, REPLY_ENDPOINTS, pinned_map};

pub struct ReplyEndpoints {
    claims: HashMap<MapData, VipKey, u32>,
    backends: Array<MapData, DoubleBuffer<Backend>>,
}

impl ReplyEndpoints {
    pub fn open_pinned(pin_path: &Path) -> Result<Self> {
        Ok(Self {
            claims: HashMap::try_from(pinned_map(pin_path, REPLY_ENDPOINTS)?)?,
            backends: Array::try_from(pinned_map(pin_path, BACKENDS)?)?,
        })
    }

    /// Every claim: endpoint -> backend id.
    pub fn claims(&self) -> Result<Vec<(VipKey, u32)>> {
        Ok(self.claims.iter().collect::<Result<_, _>>()?)
    }

    /// Removes stale claims; returns how many.
    pub fn sweep(&mut self) -> Result<usize> {
        let mut removed = 0;
        for (endpoint, id) in self.claims()? {
            let backend = self.backends.get(&id, 0).ok();
            if stale(&endpoint, backend.as_ref().map(DoubleBuffer::current))
                && self.claims.remove(&endpoint).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Whether a claim of `endpoint` by a backend id whose slot holds `backend` is stale.
pub fn stale(endpoint: &VipKey, backend: Option<&Backend>) -> bool {
    !backend.is_some_and(|b| {
        b.flags & BACKEND_IN_USE != 0
            && b.addr == endpoint.addr
            && b.port == endpoint.port
            && b.family == endpoint.family
    })
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_ALIVE, FAMILY_V4, PROTO_TCP};

    use super::*;

    #[test]
    fn a_claim_is_stale_once_its_backend_id_holds_another_endpoint_or_none() {
        let endpoint = VipKey {
            addr: [0x0b02_630a, 0, 0, 0],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        let backend = Backend {
            addr: endpoint.addr,
            port: endpoint.port,
            family: FAMILY_V4,
            flags: BACKEND_IN_USE | BACKEND_ALIVE,
            ..Default::default()
        };
        assert!(!stale(&endpoint, Some(&backend)));
        // A dead or drained backend keeps its claim: its flows may still be answered.
        let dead = Backend {
            flags: BACKEND_IN_USE,
            ..backend
        };
        assert!(!stale(&endpoint, Some(&dead)));
        assert!(stale(&endpoint, Some(&Backend::default())));
        assert!(stale(&endpoint, None));
        let moved = Backend {
            port: 81u16.to_be(),
            ..backend
        };
        assert!(stale(&endpoint, Some(&moved)));
    }
}
