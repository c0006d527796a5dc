//! What the balancer decided for a packet's flow, shared by the flow cache, the slow path,
//! the senders and the trace.
use core::ptr::write_volatile;

use crate::nat::Snat;

/// A flow's target as the flow cache or the slow path decided it (its backend is looked up
/// by id afterwards).
#[derive(Clone, Copy, Default)]
pub struct Decided {
    pub service_id: u32,
    pub mode: u8,
    pub flags: u8,
    pub new_flow: bool,
    pub backend_id: u32,
    pub snat: Snat,
}

impl Decided {
    /// Starts a packet's decision afresh. Field by field: a whole default value written at
    /// once becomes a call to the library memset, whose byte loop the verifier walks at
    /// every call site.
    #[inline(always)]
    pub fn reset(&mut self, service_id: u32, mode: u8, flags: u8, new_flow: bool) {
        unsafe {
            write_volatile(&raw mut self.service_id, service_id);
            write_volatile(&raw mut self.mode, mode);
            write_volatile(&raw mut self.flags, flags);
            write_volatile(&raw mut self.new_flow, new_flow);
            write_volatile(&raw mut self.backend_id, 0);
            write_volatile(&raw mut self.snat.port, 0);
            for word in 0..4 {
                write_volatile(&raw mut self.snat.addr[word], 0);
            }
        }
    }
}
