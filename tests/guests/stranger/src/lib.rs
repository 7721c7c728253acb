//! A component of another world (`example:stranger`): valid WebAssembly, not a Roomcast plugin.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ world: "stranger", path: "wit" });

    struct Stranger;

    impl Guest for Stranger {
        fn run(input: String) -> String {
            input.to_uppercase()
        }
    }

    export!(Stranger);
}
