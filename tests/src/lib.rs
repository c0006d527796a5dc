//! Test harness: namespaces, processes, the netns topology, the agent, client helpers, and
//! BPF_PROG_TEST_RUN fixtures.
//! Everything a test creates is removed when its guard drops, also on panic.
pub mod agent;
pub mod browser;
pub mod client;
pub mod docker;
pub mod flood;
pub mod netns;
pub mod process;
pub mod remote;
pub mod soak;
pub mod swarm;
pub mod testrun;
pub mod topology;
pub mod trace;
