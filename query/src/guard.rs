//! Stopping a query's work, not only its answer.
//!
//! Every node of a query's physical plan is wrapped in a [`GuardExec`]
//! whose stream does two things on each poll: it fails at once when the
//! query's [`Stop`] flag is set (timeout, cancel, client gone, shutdown),
//! and it spends a unit of the task's cooperative budget, so that a CPU-bound
//! operator above it — an aggregate draining a cross join, say — returns
//! control to the query executor regularly, where an abort takes effect.
//! DataFusion's own cooperative yielding only covers sources and exchanges;
//! an operator that keeps producing from memory (cross and nested-loop
//! joins, sort and window output) would otherwise run to the end unchecked.
//! The same poll is where a query thread pauses while ingest is busy (see
//! [`crate::throttle`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::{
    ChildrenPropertiesMode, ReplaceChildrenOptions, replace_children_if_necessary,
};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures_util::{Stream, StreamExt};
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::throttle::Throttle;

/// Why a query was stopped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Timeout,
    /// Cancelled by id over the API.
    Cancelled,
    /// The client went away before the answer.
    ClientGone,
    Shutdown,
}

impl StopReason {
    fn code(self) -> u8 {
        match self {
            StopReason::Timeout => 1,
            StopReason::Cancelled => 2,
            StopReason::ClientGone => 3,
            StopReason::Shutdown => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => StopReason::Timeout,
            2 => StopReason::Cancelled,
            3 => StopReason::ClientGone,
            4 => StopReason::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Timeout => "time limit reached",
            StopReason::Cancelled => "cancelled",
            StopReason::ClientGone => "client disconnected",
            StopReason::Shutdown => "shutting down",
        })
    }
}

/// A query's stop flag: set once, with the first reason winning.
#[derive(Debug, Default)]
pub struct Stop {
    reason: AtomicU8,
    notify: Notify,
}

impl Stop {
    /// Sets the flag; false when it was already set (the first reason stays).
    pub fn stop(&self, reason: StopReason) -> bool {
        let set = self
            .reason
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if set {
            self.notify.notify_waiters();
        }
        set
    }

    pub fn reason(&self) -> Option<StopReason> {
        StopReason::from_code(self.reason.load(Ordering::Acquire))
    }

    /// Resolves once the flag is set.
    pub async fn stopped(&self) -> StopReason {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a stop in between is not missed.
            notified.as_mut().enable();
            if let Some(r) = self.reason() {
                return r;
            }
            notified.await;
        }
    }

    fn error(&self) -> Option<DataFusionError> {
        self.reason()
            .map(|r| DataFusionError::Execution(format!("query stopped: {r}")))
    }
}

/// What every plan node of one query checks on each poll.
#[derive(Debug, Clone)]
pub struct Leash {
    pub stop: Arc<Stop>,
    pub throttle: Option<Throttle>,
    /// Held by every node while it is alive (see [`crate::running::Turn`]).
    pub work: Arc<()>,
}

/// Wraps every node of `plan` in a [`GuardExec`] holding `leash`.
///
/// `EXPLAIN ANALYZE` too: it runs the query it measures in tasks of its
/// own, which an abort of the query's task does not reach, so only the
/// guards' stop checks end that work. Its output shows the guards.
pub fn guard(plan: Arc<dyn ExecutionPlan>, leash: &Leash) -> Result<Arc<dyn ExecutionPlan>> {
    let children = plan
        .children()
        .into_iter()
        .map(|c| guard(c.clone(), leash))
        .collect::<Result<Vec<_>>>()?;
    let plan = if children.is_empty() {
        plan
    } else {
        replace_children_if_necessary(plan, children)?
    };
    Ok(Arc::new(GuardExec::new(plan, leash.clone())))
}

/// A pass-through node: same output, same properties, with a stop check,
/// a cooperative yield point and the ingest throttle on every poll.
#[derive(Debug)]
pub struct GuardExec {
    input: Arc<dyn ExecutionPlan>,
    leash: Leash,
    properties: Arc<PlanProperties>,
}

impl GuardExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, leash: Leash) -> Self {
        let properties = input.properties().clone();
        GuardExec {
            input,
            leash,
            properties,
        }
    }
}

impl DisplayAs for GuardExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuardExec")
    }
}

impl ExecutionPlan for GuardExec {
    fn name(&self) -> &str {
        "GuardExec"
    }

    // Invisible to code that downcasts a child to find, say, a hash join.
    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.input.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(format!(
                "GuardExec has one child, got {}",
                children.len()
            )));
        }
        Ok(Arc::new(GuardExec::new(
            children.swap_remove(0),
            self.leash.clone(),
        )))
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if let Some(e) = self.leash.stop.error() {
            return Err(e);
        }
        Ok(Box::pin(GuardStream {
            inner: self.input.execute(partition, context)?,
            leash: self.leash.clone(),
            pause: None,
        }))
    }
}

struct GuardStream {
    inner: SendableRecordBatchStream,
    leash: Leash,
    pause: Option<Pin<Box<Sleep>>>,
}

impl GuardStream {
    /// Ready once this query thread may run on.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(pause) = &mut self.pause {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match self.leash.throttle.as_ref().and_then(Throttle::pause) {
                Some(d) => self.pause = Some(Box::pin(tokio::time::sleep(d))),
                None => return Poll::Ready(()),
            }
        }
    }
}

impl Stream for GuardStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(e) = self.leash.stop.error() {
            return Poll::Ready(Some(Err(e)));
        }
        ready!(self.poll_turn(cx));
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let polled = self.inner.poll_next_unpin(cx);
        if polled.is_ready() {
            coop.made_progress();
        }
        polled
    }
}

impl RecordBatchStream for GuardStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}
