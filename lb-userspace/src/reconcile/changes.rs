//! What one `apply` changed, as the agent reports it.
use std::collections::BTreeMap;

/// What one `apply` changed, and which services it could not apply.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub services_added: usize,
    pub services_removed: usize,
    pub rings_written: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Service name -> why it keeps its previous state.
    pub failed: BTreeMap<String, String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// "no change", or what changed, as the reload event and `xlb reload` say it.
impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = [
            (self.services_added, "service added", "services added"),
            (self.services_removed, "service removed", "services removed"),
            (self.rings_written, "ring written", "rings written"),
            (self.backends_added, "backend added", "backends added"),
            (self.backends_removed, "backend removed", "backends removed"),
        ];
        let mut parts: Vec<String> = counts
            .iter()
            .filter(|(n, ..)| *n > 0)
            .map(|(n, one, many)| format!("{n} {}", if *n == 1 { one } else { many }))
            .collect();
        parts.extend(
            self.failed
                .iter()
                .map(|(service, why)| format!("{service} not applied: {why}")),
        );
        if parts.is_empty() {
            return f.write_str("no change");
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_changed_or_no_change() {
        assert_eq!(Changes::default().to_string(), "no change");
        let changes = Changes {
            services_added: 1,
            rings_written: 2,
            backends_removed: 1,
            failed: [("web".to_string(), "no room".to_string())].into(),
            ..Changes::default()
        };
        assert_eq!(
            changes.to_string(),
            "1 service added, 2 rings written, 1 backend removed, web not applied: no room"
        );
    }
}
