//! How lockctl renders results: human-readable text and JSON objects.

use lockd_protocol::{ClusterStatus, SessionGrant, Stat};
use serde_json::{json, Value};

/// Standard base64 with padding, for binary node data in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Node data as JSON fields: `data` when it is UTF-8, else `data_base64`.
pub(crate) fn data_fields(data: &[u8], obj: &mut serde_json::Map<String, Value>) {
    match std::str::from_utf8(data) {
        Ok(s) => {
            obj.insert("data".into(), json!(s));
        }
        Err(_) => {
            obj.insert("data_base64".into(), json!(base64(data)));
        }
    }
}

pub(crate) fn stat_json(stat: &Stat) -> Value {
    json!({
        "version": stat.version,
        "create_rev": stat.create_rev,
        "mod_rev": stat.mod_rev,
        "children_version": stat.children_version,
        "ephemeral_owner": stat.ephemeral_owner.map(|s| s.to_string()),
        "data_len": stat.data_len,
        "num_children": stat.num_children,
    })
}

pub(crate) fn stat_text(path: &str, stat: &Stat, revision: u64) -> String {
    let owner = stat
        .ephemeral_owner
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    format!(
        "path              {path}\n\
         version           {}\n\
         create_rev        {}\n\
         mod_rev           {}\n\
         children_version  {}\n\
         ephemeral_owner   {owner}\n\
         data_len          {}\n\
         num_children      {}\n\
         revision          {revision}",
        stat.version,
        stat.create_rev,
        stat.mod_rev,
        stat.children_version,
        stat.data_len,
        stat.num_children
    )
}

pub(crate) fn grant_json(grant: &SessionGrant) -> Value {
    json!({
        "session": grant.session.to_string(),
        "ttl_ms": grant.ttl_ms,
        "tick_ms": grant.tick_ms,
        "drift_ppm": grant.drift_ppm,
    })
}

pub(crate) fn grant_text(grant: &SessionGrant) -> String {
    format!(
        "session {} ttl {}ms tick {}ms drift {}ppm",
        grant.session, grant.ttl_ms, grant.tick_ms, grant.drift_ppm
    )
}

pub(crate) fn cluster_json(status: &ClusterStatus, revision: u64) -> Value {
    let members: Vec<Value> = status
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "client_addr": m.client_addr,
                "leader": status.leader == Some(m.id),
                "learner": status.learners.contains(&m.id),
            })
        })
        .collect();
    json!({
        "cluster_id": format!("{:#x}", status.cluster_id),
        "node_id": status.node_id,
        "leader": status.leader,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "members": members,
        "revision": revision,
    })
}

pub(crate) fn cluster_text(status: &ClusterStatus, revision: u64) -> String {
    let leader = status
        .leader
        .map_or_else(|| "none".to_string(), |l| l.to_string());
    let mut out = format!(
        "cluster   {:#x}\nnode      {}\nleader    {leader}\nterm      {}\ncommit    {}\napplied   {}\nrevision  {revision}\nmembers",
        status.cluster_id, status.node_id, status.term, status.commit_index, status.applied_index
    );
    for m in &status.members {
        let role = if status.leader == Some(m.id) {
            " (leader)"
        } else if status.learners.contains(&m.id) {
            " (learner)"
        } else {
            ""
        };
        out.push_str(&format!("\n  {} {}{role}", m.id, m.client_addr));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn data_is_text_or_base64() {
        let mut m = serde_json::Map::new();
        data_fields(b"hi", &mut m);
        assert_eq!(m["data"], "hi");
        let mut m = serde_json::Map::new();
        data_fields(&[0xff], &mut m);
        assert_eq!(m["data_base64"], "/w==");
    }
}
