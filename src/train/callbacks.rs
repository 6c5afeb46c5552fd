//! Hooks into the training loop (the script layer forwards them to Rhai closures); any of them
//! can stop training cleanly.

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

pub trait Callbacks {
    fn on_log(&mut self, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_evaluate(&mut self, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_save(&mut self, _checkpoint: &Path) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_step_end(&mut self, _state: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
}

pub struct NoCallbacks;
impl Callbacks for NoCallbacks {}
