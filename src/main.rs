fn main() {
    std::process::exit(qscript::cli::main());
}
