//! The agent's side of VIP announcement: which table announces, and what it announces after
//! each apply.
use super::Agent;
use crate::{
    announce::{self, Announcer},
    reconcile::AppliedView,
};

impl Agent {
    /// Announces from `table` (none: not at all) instead; what the old table announced goes.
    pub(super) fn set_announce_table(&mut self, table: Option<u32>) {
        self.withdraw_all();
        self.announcer = table.map(Announcer::new);
    }

    /// Announces the VIPs that can serve, as `services` are applied.
    pub(super) fn announce(&mut self, services: &[AppliedView]) {
        if let Some(announcer) = &mut self.announcer {
            announcer.sync(&announce::serving_vips(&self.desired, services));
        }
    }

    /// Withdraws every VIP (on stop, or before another table takes over).
    pub(super) fn withdraw_all(&mut self) {
        if let Some(announcer) = &mut self.announcer {
            announcer.withdraw_all();
        }
    }
}
