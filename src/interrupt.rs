//! Interrupting the calls that run on an op: [`Interrupter::interrupt`] moves the op's
//! interrupt generation on; each call keeps a `Stop` made from the generation at its
//! start and checks it between blocks of samples, failing with
//! [`Status::Interrupted`] once the generation has moved. Calls that start after an
//! interrupt are not affected. Interrupting is one atomic increment: safe from any
//! thread, and from a signal handler.

use crate::error::{Error, Result, Status};
use std::sync::atomic::{AtomicU64, Ordering};

/// The interrupt generation of an op.
#[derive(Debug, Default)]
pub struct Interrupter {
    generation: AtomicU64,
}

impl Interrupter {
    /// Stops every call that is running now, at its next check.
    pub fn interrupt(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// What a call starting now checks.
    pub(crate) fn stop(&self) -> Stop<'_> {
        Stop {
            generation: Some(&self.generation),
            start: self.generation.load(Ordering::SeqCst),
        }
    }
}

/// What one call checks between its blocks: whether its op was interrupted since it
/// started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop<'a> {
    generation: Option<&'a AtomicU64>,
    start: u64,
}

impl Stop<'_> {
    /// A call that cannot be interrupted (the completion of a two-phase draw).
    pub(crate) const NEVER: Stop<'static> = Stop {
        generation: None,
        start: 0,
    };

    /// `Err(Interrupted)` once the op was interrupted after the call started.
    pub(crate) fn check(&self) -> Result<()> {
        match self.generation {
            Some(g) if g.load(Ordering::Relaxed) != self.start => Err(Error::new(
                Status::Interrupted,
                "the call was interrupted (pert_op_interrupt) before it finished: nothing was written",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_sees_only_interrupts_after_its_start() {
        let op = Interrupter::default();
        op.interrupt();
        let stop = op.stop();
        assert!(stop.check().is_ok());
        op.interrupt();
        assert_eq!(stop.check().unwrap_err().status(), Status::Interrupted);
        assert!(op.stop().check().is_ok());
        assert!(Stop::NEVER.check().is_ok());
    }
}
