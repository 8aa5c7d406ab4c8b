//! Leader election over a `coordination.k8s.io` `Lease`, as client-go's
//! leaderelection does: every replica serves proxies, only the holder
//! writes to the cluster (statuses, the webhook's `caBundle`).
//!
//! A holder renews every [`LeaseConfig::retry`]; another replica takes the
//! lease once it has seen the same record unchanged for the lease's
//! duration — measured on its own clock, so clock skew between nodes does
//! not matter. Writes go through `replace` with the object's
//! `resourceVersion`, so of two replicas racing only one wins (the other
//! gets 409 Conflict). A holder that cannot renew within
//! [`LeaseConfig::renew_deadline`] stops leading before the lease can pass
//! to another.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What this replica last saw of someone else's lease, and when.
struct Observed {
    holder: String,
    renew: Option<MicroTime>,
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// One round: takes or renews the lease when it is free, expired or
    /// ours. `Ok(true)`: this replica holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = &self.config.identity;
        let seconds = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != *me && !holder.is_empty() {
            let same = self
                .observed
                .as_ref()
                .is_some_and(|o| o.holder == holder && o.renew == spec.renew_time);
            if !same {
                self.observed = Some(Observed {
                    holder,
                    renew: spec.renew_time.clone(),
                    at: Instant::now(),
                });
                return Ok(false);
            }
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.duration, Duration::from_secs);
            if self
                .observed
                .as_ref()
                .is_some_and(|o| o.at.elapsed() < theirs)
            {
                return Ok(false);
            }
        }
        if holder != *me {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me.clone());
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown), so another replica need not wait
    /// for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    /// Campaigns until `shutdown`, telling `leading` whether this replica
    /// leads; releases the lease on the way out.
    pub fn run(
        self,
        leading: watch::Sender<bool>,
        shutdown: watch::Receiver<bool>,
    ) -> lumen_core::BoxFuture<'static, ()> {
        Box::pin(self.campaign(leading, shutdown))
    }

    async fn campaign(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut last_renewed: Option<Instant> = None;
        loop {
            // A call that hangs must not keep this replica leading past
            // the renew deadline, when another may take the lease.
            let deadline = self.config.renew_deadline;
            match tokio::time::timeout(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = Some(Instant::now()),
                Ok(Ok(false)) => last_renewed = None,
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "cannot reach the leader lease")
                }
                Err(_) => tracing::warn!(
                    lease = %self.config.name,
                    "the leader lease did not answer within the renew deadline"
                ),
            }
            let lead = last_renewed.is_some_and(|t| t.elapsed() < self.config.renew_deadline);
            leading.send_if_modified(|was| {
                if *was != lead {
                    tracing::info!(
                        lease = %self.config.name,
                        identity = %self.config.identity,
                        leading = lead,
                        "leadership changed"
                    );
                    *was = lead;
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "cannot release the leader lease; it expires by itself");
            }
        }
    }
}
