//! Proxy identity on Kubernetes: a sidecar presents its pod's projected
//! service-account token (audience `lumen`) instead of a join token, the
//! control plane asks the API server whose it is with a `TokenReview`, and
//! the mesh CA issues that service account's SPIFFE id — as Istio's CA
//! does. Nothing the pod says about itself is trusted beyond the token.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::server::{Reviewed, TokenReviewer};

/// Longest wait for the API server's answer.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks the API server about tokens.
pub struct KubeTokenReviewer {
    client: kube::Client,
    audience: String,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client, audience: impl Into<String>) -> Self {
        KubeTokenReviewer {
            client,
            audience: audience.into(),
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review(&self, token: String) -> Reviewed {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let audience = self.audience.clone();
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![audience.clone()]),
                },
                ..Default::default()
            };
            // A certificate request waits for it: bounded, so a slow API
            // server slows renewals rather than holding them forever.
            let answer =
                tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                    .await
                    .map_err(|_| format!("TokenReview took longer than {REVIEW_TIMEOUT:?}"))?
                    .map_err(|e| format!("TokenReview failed: {e}"))?;
            let status = answer.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Err(status
                    .error
                    .unwrap_or_else(|| "the API server did not authenticate it".into()));
            }
            // The audiences it is valid for, of those asked: ours, or it
            // was meant for something else (an API server that names none
            // has not said the token is for us).
            if !status
                .audiences
                .as_ref()
                .is_some_and(|a| a.contains(&audience))
            {
                return Err(format!("the token is not for audience {audience:?}"));
            }
            let user = status
                .user
                .and_then(|u| u.username)
                .ok_or("the TokenReview names no user")?;
            let (namespace, account) = user
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .ok_or_else(|| format!("{user} is not a service account"))?;
            Ok((namespace.to_string(), account.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    /// Answers one TokenReview with `status`, checking what was asked.
    async fn reviewed(status: Value) -> Result<(String, String), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("no TokenReview asked");
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = request.into_body().collect_bytes().await.expect("body");
            let asked: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(asked["spec"]["token"], "eyJhbGciOi.token");
            assert_eq!(asked["spec"]["audiences"], json!(["lumen"]));
            let mut answer = asked.clone();
            answer["status"] = status;
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&answer).expect("answer"),
            )));
        });
        let got = KubeTokenReviewer::new(client, "lumen")
            .review("eyJhbGciOi.token".into())
            .await;
        server.await.expect("the mock API server");
        got
    }

    #[tokio::test]
    async fn a_pods_token_proves_its_service_account() {
        let got = reviewed(json!({
            "authenticated": true,
            "audiences": ["lumen"],
            "user": {"username": "system:serviceaccount:bookinfo:bookinfo-reviews",
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:bookinfo"]},
        }))
        .await;
        assert_eq!(got, Ok(("bookinfo".into(), "bookinfo-reviews".into())));
    }

    #[tokio::test]
    async fn what_the_api_server_does_not_vouch_for_is_refused_saying_why() {
        let expired = reviewed(json!({"authenticated": false, "error": "token has expired"})).await;
        assert_eq!(expired, Err("token has expired".into()));
        let other = reviewed(json!({
            "authenticated": true, "audiences": ["vault"],
            "user": {"username": "system:serviceaccount:a:b"},
        }))
        .await;
        assert_eq!(other, Err("the token is not for audience \"lumen\"".into()));
        let person = reviewed(json!({
            "authenticated": true, "audiences": ["lumen"],
            "user": {"username": "jane@example.com"},
        }))
        .await;
        assert_eq!(
            person,
            Err("jane@example.com is not a service account".into())
        );
        // An API server that does not say the token is for us.
        let unsaid = reviewed(json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:a:b"},
        }))
        .await;
        assert_eq!(
            unsaid,
            Err("the token is not for audience \"lumen\"".into())
        );
    }
}
