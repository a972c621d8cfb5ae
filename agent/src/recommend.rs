//! `ragent recommend`: asks a running agent for its right-sizing report.
use std::time::Duration;

use crate::core::usage::Report;

/// How long the agent gets to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    #[error(
        "cannot reach the agent at {url}: {reason}; is `ragent agent` running there? Give its metrics address with --agent (or RAGENT_AGENT_URL)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the agent at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "the agent at {url} sent a report this ragent cannot read ({source}); use the same ragent version for `recommend` and the agent"
    )]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The endpoint under an agent's base URL (`http://host:port`, a trailing `/` allowed).
pub fn endpoint(agent: &str) -> String {
    format!("{}/api/v1/recommendations", agent.trim_end_matches('/'))
}

/// The agent's report, as parsed and as the JSON it sent.
pub async fn fetch(agent: &str) -> Result<(Report, serde_json::Value), RecommendError> {
    let url = endpoint(agent);
    let unreachable = |e: &dyn std::fmt::Display| RecommendError::Unreachable {
        url: url.clone(),
        reason: e.to_string(),
    };
    // reqwest is built without a default TLS provider (the agent picks ring): without one it
    // panics building even a plain-HTTP client.
    crate::adapters::registry::install_tls_provider();
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| unreachable(&e))?;
    let response = client.get(&url).send().await.map_err(|e| {
        // reqwest's top-level message is terse; the cause says what happened.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason = format!("{reason}: {s}");
            source = s.source();
        }
        unreachable(&reason)
    })?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| unreachable(&e))?;
    if status != 200 {
        return Err(RecommendError::Status {
            url,
            status,
            body: body.trim().to_string(),
        });
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|source| RecommendError::Decode {
            url: url.clone(),
            source,
        })?;
    let report = serde_json::from_value(value.clone())
        .map_err(|source| RecommendError::Decode { url, source })?;
    Ok((report, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_under_the_agent_url() {
        assert_eq!(
            endpoint("http://127.0.0.1:9464/"),
            "http://127.0.0.1:9464/api/v1/recommendations"
        );
        assert_eq!(
            endpoint("http://node:9464"),
            "http://node:9464/api/v1/recommendations"
        );
    }

    #[tokio::test]
    async fn an_unreachable_agent_names_the_url_and_what_to_do() {
        // Port 1 on loopback: nothing listens there.
        let e = fetch("http://127.0.0.1:1").await.unwrap_err().to_string();
        assert!(
            e.contains("http://127.0.0.1:1/api/v1/recommendations"),
            "{e}"
        );
        assert!(e.contains("--agent"), "{e}");
    }
}
