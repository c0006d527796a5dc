//! Who may change state through a listener: anyone who can connect to the control socket
//! (its file mode decides), and on the read API only a request with the bearer token of
//! `agent.control_token_file`, when there is one.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use axum::{
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};

#[derive(Clone)]
pub enum Gate {
    /// The control socket: whoever connected may.
    Open,
    /// The read API: only with this token; else the answer names the control socket.
    Token { token: Arc<[u8]>, control: PathBuf },
    /// The read API without a token: never.
    Closed { control: PathBuf },
}

impl Gate {
    /// The answer refusing the request, if it may not change state.
    pub fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        match self {
            Gate::Open => None,
            Gate::Closed { control } => Some(
                (
                    StatusCode::FORBIDDEN,
                    format!(
                        "this API only reads; drain, undrain and reload go through the control \
                     socket {} (`xlb drain|undrain|reload`, as root or a member of \
                     agent.control_group)\n",
                        control.display()
                    ),
                )
                    .into_response(),
            ),
            Gate::Token { token, control } => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                if given.is_some_and(|given| same(given, token)) {
                    return None;
                }
                Some(
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        format!(
                            "control on this API needs `Authorization: Bearer <the token of \
                         agent.control_token_file>`; or use the control socket {}\n",
                            control.display()
                        ),
                    )
                        .into_response(),
                )
            }
        }
    }
}

/// Equal, in a time that depends only on the lengths (not on where the bytes differ).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The token in `path`: its content without surrounding whitespace. Refused if others may
/// read or write the file, or if it is empty.
pub fn read_token(path: &Path) -> Result<Arc<[u8]>> {
    let what = || format!("agent.control_token_file {}", path.display());
    let mode = std::fs::metadata(path)
        .with_context(what)?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        bail!(
            "{}: mode {:o} lets every user read or change the token; chmod o-rw it",
            what(),
            mode & 0o777
        );
    }
    let text = std::fs::read(path).with_context(what)?;
    let token = text.trim_ascii();
    if token.is_empty() {
        bail!("{}: is empty", what());
    }
    Ok(token.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn only_the_right_token_passes() {
        let gate = Gate::Token {
            token: b"s3cret".as_slice().into(),
            control: "/run/xlb/control.sock".into(),
        };
        assert!(gate.refusal(&bearer("Bearer s3cret")).is_none());
        for wrong in [
            "Bearer s3cres",
            "Bearer s3cret2",
            "Bearer ",
            "s3cret",
            "Basic s3cret",
        ] {
            let refused = gate.refusal(&bearer(wrong)).unwrap();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{wrong}");
        }
        assert!(gate.refusal(&HeaderMap::new()).is_some());
        let closed = Gate::Closed {
            control: "/run/xlb/control.sock".into(),
        };
        let refused = closed.refusal(&bearer("Bearer s3cret")).unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(Gate::Open.refusal(&HeaderMap::new()).is_none());
    }

    #[test]
    fn same_compares_whole_slices() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(same(b"", b""));
    }
}
