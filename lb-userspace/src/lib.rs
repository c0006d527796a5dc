//! The xlb agent: config, discovery, state, reconcile, and the BPF data path loader.
pub mod agent;
pub mod api;
pub mod config;
pub mod datapath;
pub mod loader;
pub mod maglev;
pub mod reconcile;
pub mod state;
pub mod status;
