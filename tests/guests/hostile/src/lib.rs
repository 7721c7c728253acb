//! A hostile tenant plugin of `roomcast:plugin@0.2.0`. `on-message` misbehaves as the message
//! body asks (what 0.1.0 called `validate`):
//!
//! | body        | what it does |
//! |-------------|--------------|
//! | `loop`      | spins forever (fuel, then the deadline) |
//! | `grow`      | allocates without end (the memory cap) |
//! | `recurse`   | recurses without end (the wasm stack) |
//! | `trap`      | panics |
//! | `giant`     | rewrites the message to 1 MiB (the output limit) |
//! | `flood`     | logs ten thousand lines and prints to stdout (the log limit) |
//! | `clock`     | rewrites the message to the wall clock it sees (must be the record's time) |
//! | `sleep`     | sleeps ten seconds (a host call: the deadline must still hold) |
//! | `sleep-forever` | sleeps without end |
//! | `sleep-clock` | sleeps 2.5 s and rewrites the message to how far its monotonic and wall clocks moved, in ms |
//! | `stdin`     | reads stdin to its end (closed: nothing to read) |
//! | `socket`    | opens a TCP connection (denied) and rewrites the message to what happened |
//! | `print`     | prints to stdout and stderr, and panics with a message |
//! | `random`    | rewrites the message to a `HashMap`'s order, a randomly seeded hash and a random `u64` from `wasi:random` |
//!
//! | `pad:…`     | rewrites the message to itself with 2 KB more (a rewrite that grows, as escaping does) |
//! | `env`       | rewrites the message to the environment variables and arguments it sees (none) |
//! | `files`     | rewrites the message to what opening `/etc/passwd` and listing `/` gave (refused) |
//!
//! | `config-echo` | rewrites the message to its configuration's `big` value |
//! | `config-loop` | reads its configuration without end (each read a host call and a copy) |
//! | `config-hoard` | reads its configuration's `big` value without end, keeping every copy |
//!
//! Its routing misbehaves the same way: `route-aliased` names one room 18,000 times, `route-wide`
//! names 20 rooms, `route-trap` panics, `route-loop` spins, `route-grow` allocates without end,
//! `route-to-bob` narrows the message to the user `bob`, `route-everyone` narrows it to 5,000
//! users (a big room's every member, within the output limit), `route-repeats` names `side` and the message's own room over and over, `route-foreign`
//! names other tenants' rooms as the table keys them (`globex#side`, `ROOM#globex#side`) and
//! things that are not rooms at all (`""`, `../side`).
//!
//! `authorize-join` misbehaves as the room asks: `loop`, `trap`, `grow`, `recurse`, `flood`,
//! `sleep-forever`, `config-loop`, `config-hoard` as above, `giant` denies with a 1 MiB reason,
//! `allow-then-trap` decides to allow and traps before it returns, `deny-…` denies, anything else
//! is allowed.
//! `hooks` claims every hook.
//!
//! `welcome` misbehaves as the user id asks: `loop`, `trap`, `grow` as above, `giant` greets
//! with 1 MiB; anyone else gets no greeting.
//!
//! Anything else is accepted.

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "../../../wit/roomcast-plugin.wit" });

    use roomcast::plugin::host::{Level, config, log};
    use roomcast::plugin::types::{Routing, Verdict};

    struct Hostile;

    /// Spins without end (fuel, then the deadline, stop it).
    fn spin() -> ! {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    /// Allocates a MiB at a time without writing it: cheap in fuel, so the memory cap (not
    /// fuel) is what stops it.
    fn hoard() -> ! {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = Vec::<u8>::with_capacity(1 << 20);
            chunk.push(1);
            hoard.push(std::hint::black_box(chunk));
        }
    }

    /// Reads the configuration without end: each read a host call and a string copied in.
    fn read_config_forever() -> ! {
        loop {
            std::hint::black_box(config("big"));
        }
    }

    /// Reads the configuration's `big` value without end, keeping every copy (the memory cap).
    fn hoard_config() -> ! {
        let mut copies = Vec::new();
        loop {
            copies.push(std::hint::black_box(config("big")));
        }
    }

    /// Panics when dropped: a decision made, then a trap on the way out.
    struct Bomb;

    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("the hostile plugin traps after deciding");
        }
    }

    /// Deep recursion on the wasm call stack itself (no locals in linear memory).
    #[inline(never)]
    fn recurse(depth: u64) -> u64 {
        if std::hint::black_box(depth) == u64::MAX { 0 } else { recurse(depth + 1).wrapping_add(depth) }
    }

    impl Guest for Hostile {
        fn hooks() -> Hooks {
            Hooks::all()
        }

        fn on_message(message: Message) -> MessageOutcome {
            if message.body.starts_with("route-") {
                return MessageOutcome { verdict: Verdict::Accept, routing: route(message) };
            }
            MessageOutcome { verdict: validate(message), routing: plain() }
        }

        fn authorize_join(request: JoinRequest) -> JoinDecision {
            match request.room.as_str() {
                "loop" => spin(),
                "trap" => panic!("the hostile plugin's authorize-join panics on purpose"),
                "grow" => hoard(),
                "recurse" => JoinDecision::Deny(recurse(0).to_string()),
                "flood" => {
                    for i in 0..10_000 {
                        log(Level::Info, &format!("line {i}"));
                    }
                    JoinDecision::Allow
                }
                "sleep-forever" => loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
                "giant" => JoinDecision::Deny("x".repeat(1 << 20)),
                "config-loop" => read_config_forever(),
                "config-hoard" => hoard_config(),
                "allow-then-trap" => {
                    let _bomb = Bomb;
                    JoinDecision::Allow
                }
                room if room.starts_with("deny-") => {
                    JoinDecision::Deny(format!("{} may not join {room}", request.user_id))
                }
                _ => JoinDecision::Allow,
            }
        }

        fn welcome(info: WelcomeInfo) -> Option<String> {
            match info.user_id.as_str() {
                "loop" => spin(),
                "trap" => panic!("the hostile plugin's welcome panics on purpose"),
                "grow" => hoard(),
                "giant" => Some("x".repeat(1 << 20)),
                _ => None,
            }
        }
    }

    fn plain() -> Routing {
        Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
    }

    fn validate(message: Message) -> Verdict {
        match message.body.as_str() {
            "loop" => spin(),
            "grow" => hoard(),
            "recurse" => Verdict::Rewrite(recurse(0).to_string()),
            "trap" => panic!("the hostile plugin panics on purpose"),
            "giant" => Verdict::Rewrite("x".repeat(1 << 20)),
            "flood" => {
                for i in 0..10_000 {
                    log(Level::Info, &format!("line {i}"));
                }
                println!("to stdout as well");
                Verdict::Accept
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(10));
                Verdict::Accept
            }
            "sleep-forever" => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            "sleep-clock" => {
                let (started, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
                std::thread::sleep(std::time::Duration::from_millis(2500));
                let walled = wall.elapsed().map(|d| d.as_millis()).unwrap_or_default();
                Verdict::Rewrite(format!("{} {walled}", started.elapsed().as_millis()))
            }
            "stdin" => {
                use std::io::Read;
                let mut input = String::new();
                let read = std::io::stdin().read_to_string(&mut input);
                Verdict::Rewrite(format!("stdin: {read:?}"))
            }
            "socket" => {
                let connected = std::net::TcpStream::connect("127.0.0.1:9").map(|_| ());
                Verdict::Rewrite(format!("socket: {connected:?}"))
            }
            "print" => {
                println!("to stdout");
                eprintln!("to stderr");
                panic!("the hostile plugin panics after printing");
            }
            "random" => {
                use std::hash::BuildHasher;
                let map: std::collections::HashMap<u32, u32> = (0..16).map(|i| (i, i)).collect();
                let order: Vec<&u32> = map.keys().collect();
                let hashed = std::collections::hash_map::RandomState::new().hash_one(7u64);
                let drawn = getrandom::u64().unwrap_or_default();
                Verdict::Rewrite(format!("{order:?} {hashed} {drawn}"))
            }
            padded if padded.starts_with("pad:") => Verdict::Rewrite(format!("{padded}{}", "x".repeat(2048))),
            "env" => {
                let vars: Vec<(String, String)> = std::env::vars().collect();
                let args: Vec<String> = std::env::args().collect();
                Verdict::Rewrite(format!("env: {vars:?} args: {args:?}"))
            }
            "files" => {
                let passwd = std::fs::read_to_string("/etc/passwd").map(|t| t.len());
                let root = std::fs::read_dir("/").map(|d| d.count());
                Verdict::Rewrite(format!("passwd: {:?} root: {:?}", passwd.is_ok(), root.is_ok()))
            }
            "config-echo" => Verdict::Rewrite(config("big").unwrap_or_default()),
            "config-loop" => read_config_forever(),
            "config-hoard" => hoard_config(),
            "clock" => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                Verdict::Rewrite(now.as_millis().to_string())
            }
            _ => Verdict::Accept,
        }
    }

    fn route(message: Message) -> Routing {
        let plain = plain();
        match message.body.as_str() {
            // 18,000 names of one short room: within 128 KB counting bytes alone.
            "route-aliased" => Routing { extra_rooms: vec!["general".to_string(); 18_000], ..plain },
            "route-wide" => Routing { extra_rooms: (0..20).map(|i| format!("room{i}")).collect(), ..plain },
            "route-trap" => panic!("the hostile plugin's route panics on purpose"),
            "route-to-bob" => Routing { only_users: Some(vec!["bob".into()]), ..plain },
            "route-everyone" => Routing { only_users: Some((0..5_000).map(|i| format!("u{i}")).collect()), ..plain },
            "route-repeats" => {
                let rooms = ["side", message.room.as_str()].repeat(500).into_iter().map(str::to_string).collect();
                Routing { extra_rooms: rooms, ..plain }
            }
            "route-foreign" => {
                let rooms = ["globex#side", "ROOM#globex#side", "", "../side"];
                Routing { extra_rooms: rooms.into_iter().map(str::to_string).collect(), ..plain }
            }
            "route-loop" => spin(),
            "route-grow" => hoard(),
            _ => plain,
        }
    }

    export!(Hostile);
}
