//! The policy engine's events (`policy_events` rows), made in this
//! process and stored like ingested rows: through the WAL, durably.

/// Writes the policy engine's events to `policy_events` through the WAL,
/// off the decision loop; a write that fails is logged, never retried
/// into an unbounded queue.
pub struct PolicyEventWriter {
    wal: crate::wal::WalHandle,
    table: usize,
}

impl PolicyEventWriter {
    pub fn new(wal: crate::wal::WalHandle) -> Self {
        let table = crate::store::table_index(lumen_core::schema::POLICY_EVENTS)
            .expect("policy_events is a table");
        PolicyEventWriter { wal, table }
    }

    pub fn write(&self, rows: Vec<lumen_core::schema::PolicyEvent>) {
        let batch = match lumen_core::schema::policy_events_batch(&rows) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot build policy_events rows");
                return;
            }
        };
        let (wal, table) = (self.wal.clone(), self.table);
        tokio::spawn(async move {
            if let Err(e) = wal.append(vec![(table, batch)]).await {
                tracing::warn!(error = %e, rows = rows.len(), "policy events not stored");
            }
        });
    }
}
