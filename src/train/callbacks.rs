//! Hooks into the training loop (the script layer forwards them to Rhai closures); any of them
//! can stop training cleanly.

use crate::model::Model;
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Control {
    Continue,
    Stop,
}

impl Control {
    /// Stop if either says stop.
    pub fn or(self, other: Control) -> Control {
        if self == Control::Stop { self } else { other }
    }
}

/// Every hook gets the model read-only, as transformers' `TrainerCallback` gets `model`: a hook
/// may evaluate or generate with it, never change it mid-step.
pub trait Callbacks {
    fn on_log(&mut self, _model: &Model, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_evaluate(&mut self, _model: &Model, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_save(&mut self, _model: &Model, _checkpoint: &Path) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_step_end(&mut self, _model: &Model, _state: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
}

pub struct NoCallbacks;
impl Callbacks for NoCallbacks {}
