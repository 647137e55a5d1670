//! Peer credentials the controller installed here (`PUT /v1/peer-credentials/{site}`): per
//! source site, the credential that site's agent presents on the replica routes. Only a SHA-256
//! of each is kept (in `DATA/peer-credentials.json`, mode 0600): the agent checks credentials, it
//! never presents them, so its data directory holds nothing another site's agent would take.
//! No HTTP here.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::store::write_atomic;

const FILE: &str = "peer-credentials.json";

/// Per source site, the SHA-256 (hex) of the credential its agent presents here.
pub(super) struct Installed {
    path: PathBuf,
    by_site: BTreeMap<String, String>,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Installed {
    /// Loads what was installed before the agent stopped (nothing on a new data directory).
    pub(super) fn open(root: &Path) -> io::Result<Self> {
        let path = root.join(FILE);
        let by_site = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{FILE}: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self { path, by_site })
    }

    /// Makes `token` the one credential of `site` (the one before stops working at once);
    /// durable before it returns. `false`: it was already installed, nothing written.
    pub(super) fn install(&mut self, site: &str, token: &str) -> io::Result<bool> {
        let d = digest(token);
        if self.by_site.get(site) == Some(&d) {
            return Ok(false);
        }
        let mut next = self.by_site.clone();
        next.insert(site.to_string(), d);
        write_atomic(&self.path, &serde_json::to_vec_pretty(&next)?)?;
        self.by_site = next;
        Ok(true)
    }

    /// The site whose credential `token` is. Every entry is compared, in constant time each.
    pub(super) fn site_of(&self, token: &[u8]) -> Option<String> {
        let d = hex::encode(Sha256::digest(token));
        let mut found = None;
        for (site, want) in &self.by_site {
            if super::auth::constant_time_eq(d.as_bytes(), want.as_bytes()) && found.is_none() {
                found = Some(site.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_credential_replaces_the_old_and_survives_a_restart_as_a_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = Installed::open(dir.path()).unwrap();
        assert!(i.install("primary", "first-credential").unwrap());
        assert!(!i.install("primary", "first-credential").unwrap());
        assert_eq!(i.site_of(b"first-credential").as_deref(), Some("primary"));
        assert!(i.install("primary", "second-credential").unwrap());
        assert_eq!(i.site_of(b"first-credential"), None);
        let again = Installed::open(dir.path()).unwrap();
        assert_eq!(
            again.site_of(b"second-credential").as_deref(),
            Some("primary")
        );
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(!text.contains("second-credential"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
