//! Request path normalization, before authorization and routing, as Istio's
//! default (`BASE`, Envoy's `normalize_path`): percent-encoded unreserved
//! characters are decoded, other escapes are upper-cased, a backslash is a
//! slash, and `.` and `..` segments are resolved (RFC 3986 §5.2.4). `%00`
//! is refused. The normalized path is also what the upstream receives, so
//! the app and the policy see the same path.
//!
//! Like Istio's default, adjacent slashes are kept and `%2F` stays encoded:
//! an app that treats `//` as `/` needs a policy written for both.

/// Why a path was refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath;

/// The normalized form of `path` (without the query).
pub fn normalize(path: &str) -> Result<String, BadPath> {
    let bytes = path.as_bytes();
    // Bytes, not chars: a path may carry UTF-8 (or other bytes httparse
    // lets through), which must come out as it went in.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(BadPath)?;
                let text = std::str::from_utf8(hex).map_err(|_| BadPath)?;
                let v = u8::from_str_radix(text, 16).map_err(|_| BadPath)?;
                if v == 0 {
                    return Err(BadPath);
                }
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(v);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(text.to_ascii_uppercase().as_bytes());
                }
                i += 3;
            }
            b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was changed, so valid UTF-8 stays valid.
    let decoded = String::from_utf8(decoded).map_err(|_| BadPath)?;
    if !decoded.starts_with('/') {
        // `*` (OPTIONS) and authority-form are left to the router.
        return Ok(decoded);
    }
    Ok(remove_dot_segments(&decoded))
}

/// RFC 3986 §5.2.4, on an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves a directory: `/a/b/..` → `/a/`.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        for (input, want) in [
            ("/", "/"),
            ("/api/v1", "/api/v1"),
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%2e%2e/b", "/b"),
            ("/%61dmin", "/admin"),
            ("/%41%2D%5f%7E", "/A-_~"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a//b", "/a//b"),
            ("\\admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/q%20x", "/q%20x"),
            ("*", "*"),
            ("/café/../x", "/x"),
            ("/café", "/café"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        for bad in ["/a%00b", "/a%", "/a%4", "/a%zz"] {
            assert_eq!(normalize(bad), Err(BadPath), "{bad}");
        }
    }
}
