//! The xlb agent: config, discovery, state, reconcile, and the BPF data path loader.
pub mod agent;
pub mod announce;
pub mod api;
pub mod bridgeport;
pub mod config;
pub mod datapath;
pub mod decap;
pub mod discovery;
pub mod health;
pub mod iproute;
pub mod loader;
pub mod maglev;
pub mod mapped;
pub mod metrics;
pub mod reconcile;
pub mod state;
pub mod status;
