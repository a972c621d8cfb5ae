//! Layer chain IDs: the names containerd gives committed snapshots of a layer stack.
//! chain(0) = diffID(0); chain(n) = sha256(chain(n-1) + " " + diffID(n)).
use sha2::{Digest, Sha256};

pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{prev} {d}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_chain_is_the_diff_id_and_the_rest_hash_the_pair() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into()]);
        assert_eq!(ids[0], "sha256:a");
        // sha256("sha256:a sha256:b")
        assert_eq!(
            ids[1],
            format!("sha256:{:x}", Sha256::digest(b"sha256:a sha256:b"))
        );
        assert!(chain_ids(&[]).is_empty());
    }
}
