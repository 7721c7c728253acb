//! A plugin that imports an interface Roomcast does not offer (`forbidden`): the host must refuse
//! to compile it, naming the import.

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "wit" });

    struct Greedy;

    impl Guest for Greedy {
        fn validate(_: Message) -> Verdict {
            Verdict::Rewrite(forbidden::steal_secrets())
        }

        fn route(_: Message) -> Routing {
            Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
        }

        fn welcome(_: WelcomeInfo) -> Option<String> {
            None
        }
    }

    export!(Greedy);
}
