//! Credentials that must not end up in logs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A bearer token or other credential. It is serialized as the plain string (it travels in API
/// bodies and the agent keeps peer tokens in `vm.json`), but its `Debug` prints `<redacted>`,
/// so a struct holding one can derive `Debug` and still be logged.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the request that presents it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(v: &str) -> Self {
        Self(v.to_string())
    }
}

impl From<String> for Secret {
    fn from(v: String) -> Self {
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_is_redacted_and_json_is_the_plain_string() {
        let s = Secret::from("s3cr3t");
        assert_eq!(format!("{s:?} {s:#?}"), "<redacted> <redacted>");
        assert_eq!(serde_json::to_value(&s).unwrap(), "s3cr3t");
        let back: Secret = serde_json::from_str("\"s3cr3t\"").unwrap();
        assert_eq!(back.expose(), "s3cr3t");
    }
}
