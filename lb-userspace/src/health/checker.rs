//! The per-backend health state machine (HAProxy semantics): `rise` consecutive successes
//! bring a backend up, `fall` consecutive failures take it down; `fastinter` paces probes
//! while the state is changing and `downinter` while it is down. Pure: no clock, no I/O.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::HealthConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
    /// Newly added and not probed yet: takes no traffic, and one success brings it up
    /// (it is not recovering from a failure).
    Pending,
}

impl State {
    pub fn takes_traffic(self) -> bool {
        self == State::Up
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub fastinter: Duration,
    pub downinter: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl From<&HealthConfig> for Timing {
    fn from(h: &HealthConfig) -> Self {
        Timing {
            interval: h.interval,
            fastinter: h.fastinter.unwrap_or(h.interval),
            downinter: h.downinter.unwrap_or(h.interval),
            rise: h.rise,
            fall: h.fall,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Checker {
    state: State,
    /// Consecutive successes while down (toward `rise`).
    successes: u32,
    /// Consecutive failures while up (toward `fall`).
    failures: u32,
    timing: Timing,
}

impl Checker {
    pub fn new(state: State, timing: Timing) -> Self {
        Self {
            state,
            successes: 0,
            failures: 0,
            timing,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Records a probe result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<State> {
        let next = match (self.state, ok) {
            (State::Up, true) => {
                self.failures = 0;
                None
            }
            (State::Up, false) => {
                self.failures += 1;
                (self.failures >= self.timing.fall).then_some(State::Down)
            }
            (State::Down, true) => {
                self.successes += 1;
                (self.successes >= self.timing.rise).then_some(State::Up)
            }
            (State::Down, false) => {
                self.successes = 0;
                None
            }
            (State::Pending, true) => Some(State::Up),
            (State::Pending, false) => {
                self.failures += 1;
                (self.failures >= self.timing.fall).then_some(State::Down)
            }
        };
        if let Some(state) = next {
            self.state = state;
            self.successes = 0;
            self.failures = 0;
        }
        next
    }

    /// How long to wait before the next probe.
    pub fn next_delay(&self) -> Duration {
        let t = &self.timing;
        match self.state {
            State::Up if self.failures > 0 => t.fastinter,
            State::Up => t.interval,
            State::Down if self.successes > 0 => t.fastinter,
            State::Down => t.downinter,
            State::Pending => t.fastinter,
        }
    }
}
