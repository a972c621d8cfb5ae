//! The registry's access log is the ground truth for what crossed the wire: each blob GET
//! that answered 200 logs the body bytes it sent.

/// The body bytes of one access-log line if it is a blob GET answered with 200.
///
/// Lines look like `... "GET /v2/REPO/blobs/sha256:... HTTP/1.1" 200 12345 "" "agent"`.
pub fn blob_get_bytes(line: &str) -> Option<u64> {
    ok_get_bytes(line, &["/blobs/sha256:"])
}

/// The body bytes of a GET answered with 200 whose path holds one of `kinds`.
fn ok_get_bytes(line: &str, kinds: &[&str]) -> Option<u64> {
    let i = line.find("\"GET /v2/")?;
    let rest = &line[i..];
    if !kinds.iter().any(|k| rest.contains(k)) {
        return None;
    }
    let after = rest.splitn(3, '"').nth(2).unwrap_or("");
    let mut f = after.split_whitespace();
    if f.next() != Some("200") {
        return None;
    }
    Some(f.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0))
}

/// Bytes the registry served for blob GETs (status 200) in `log` after line `from`, and how
/// many such GETs there were.
pub fn served_blob_bytes(log: &str, from: usize) -> (u64, usize) {
    log.lines()
        .skip(from)
        .filter_map(blob_get_bytes)
        .fold((0, 0), |(b, n), x| (b + x, n + 1))
}

/// The body bytes of one access-log line if it is any registry GET (blob or manifest)
/// answered with 200.
pub fn get_bytes(line: &str) -> Option<u64> {
    ok_get_bytes(line, &["/blobs/sha256:", "/manifests/"])
}

/// The body bytes of one access-log line if it is a manifest GET answered with 200.
pub fn manifest_get_bytes(line: &str) -> Option<u64> {
    ok_get_bytes(line, &["/manifests/"])
}

/// Bytes the registry served for manifest and blob GETs (status 200) in `log` after line
/// `from`, and how many such GETs there were: everything a pull fetched.
pub fn served_pull_bytes(log: &str, from: usize) -> (u64, usize) {
    log.lines()
        .skip(from)
        .filter_map(get_bytes)
        .fold((0, 0), |(b, n), x| (b + x, n + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_blob_gets_answered_200() {
        let log = concat!(
            "127.0.0.1 - - [27/Nov/2026:20:00:00 +0000] \"GET /v2/r/blobs/sha256:aa HTTP/1.1\" 200 100 \"\" \"c\"\n",
            "127.0.0.1 - - [27/Nov/2026:20:00:00 +0000] \"GET /v2/r/manifests/v1 HTTP/1.1\" 200 900 \"\" \"c\"\n",
            "127.0.0.1 - - [27/Nov/2026:20:00:00 +0000] \"HEAD /v2/r/blobs/sha256:aa HTTP/1.1\" 200 0 \"\" \"c\"\n",
            "127.0.0.1 - - [27/Nov/2026:20:00:00 +0000] \"GET /v2/r/blobs/sha256:bb HTTP/1.1\" 206 50 \"\" \"c\"\n",
            "127.0.0.1 - - [27/Nov/2026:20:00:00 +0000] \"GET /v2/r/blobs/sha256:cc HTTP/1.1\" 200 7 \"\" \"c\"\n",
        );
        assert_eq!(served_blob_bytes(log, 0), (107, 2));
        assert_eq!(served_blob_bytes(log, 1), (7, 1));
        assert_eq!(served_pull_bytes(log, 0), (1007, 3));
        let manifests: Vec<u64> = log.lines().filter_map(manifest_get_bytes).collect();
        assert_eq!(manifests, [900]);
    }
}
