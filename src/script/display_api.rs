//! One readable line for values whose API files define none (what the REPL prints for them):
//! `SFTTrainer(...)`, `TrainingArguments(...)`. The trainer's live state (step, paused) belongs
//! here too once the trainer keeps it between calls.

use super::train_api::{TrainerHandle, TrainingArgumentsHandle};
use super::Api;
use crate::train::TrainingArguments;

/// The length of the run: `max_steps` or epochs, batch, learning rate, output folder.
fn args_line(a: &TrainingArguments) -> String {
    let length = match a.max_steps {
        Some(s) => format!("max_steps {s}"),
        None => format!("{} epoch{}", a.num_train_epochs, if a.num_train_epochs == 1.0 { "" } else { "s" }),
    };
    format!(
        "{length}, batch {} × accumulation {}, lr {:e}, output_dir {}",
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps,
        a.learning_rate,
        a.output_dir.display()
    )
}

fn trainer_line(t: &TrainerHandle) -> String {
    let Ok(inner) = t.0.try_borrow() else { return "SFTTrainer(training)".into() };
    let tr = &inner.trainer;
    let eval = tr.eval_data.as_ref().map(|e| format!(", eval {} examples", e.len())).unwrap_or_default();
    format!("SFTTrainer({} train examples{eval}; {})", tr.train_data.len(), args_line(&tr.args))
}

pub fn register(api: &mut Api) {
    api.func("to_string", "to_string(trainer) -> string", "The trainer's data and run length, one line.",
        |t: &mut TrainerHandle| trainer_line(t));
    api.func("to_debug", "to_debug(trainer) -> string", "The trainer's data and run length, one line.",
        |t: &mut TrainerHandle| trainer_line(t));
    api.func("to_string", "to_string(args) -> string", "The training arguments that set the run's length, one line.",
        |a: &mut TrainingArgumentsHandle| format!("TrainingArguments({})", args_line(&a.0)));
    api.func("to_debug", "to_debug(args) -> string", "The training arguments that set the run's length, one line.",
        |a: &mut TrainingArgumentsHandle| format!("TrainingArguments({})", args_line(&a.0)));
}
