//! Path rules of the namespace, shared by client (early, friendly errors) and server (the
//! authority).

use crate::Error;

/// Longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Checks that `path` is a valid absolute node path: starts with `/`, no empty segments, no
/// trailing slash (except the root `/`), no `.` or `..` segments, no NUL or other control
/// characters, at most [`MAX_PATH_LEN`] bytes.
pub fn validate(path: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Error::InvalidPath {
        path: path.chars().take(80).collect(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(invalid("empty path"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(invalid("longer than 1024 bytes"));
    }
    if !path.starts_with('/') {
        return Err(invalid("must be absolute (start with '/')"));
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(invalid("trailing '/'"));
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(invalid("empty segment ('//')")),
            "." | ".." => return Err(invalid("'.' and '..' segments are not allowed")),
            _ => {}
        }
        if segment.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "control characters (including NUL) are not allowed",
            ));
        }
    }
    Ok(())
}

/// The parent of a valid path other than `/`; `None` for the root.
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last segment of a valid path (`""` for the root).
pub fn name(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// Joins a parent path and a child name.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_paths() {
        for p in ["/", "/a", "/a/b", "/a-b_c.d/e f", "/ünï/ℂ"] {
            assert!(validate(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn rejects_invalid_paths() {
        let long = format!("/{}", "x".repeat(MAX_PATH_LEN));
        for p in [
            "", "a", "a/b", "/a/", "//", "/a//b", "/.", "/a/..", "/a\0b", "/a\nb", &long,
        ] {
            assert!(
                matches!(validate(p), Err(Error::InvalidPath { .. })),
                "{p:?} accepted"
            );
        }
    }

    #[test]
    fn parent_name_join() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(name("/a/b"), "b");
        assert_eq!(name("/"), "");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
    }
}
