# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_consul_leader_global_optspecs
    string join \n h/help V/version
end

function __fish_consul_leader_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_consul_leader_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_consul_leader_using_subcommand
    set -l cmd (__fish_consul_leader_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c consul-leader -n "__fish_consul_leader_needs_command" -s h -l help -d 'Print help'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -s V -l version -d 'Print version'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -f -a "run" -d 'Win the lock on a key, run a command while it is held, stop it when leadership ends'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -f -a "status" -d 'Show who holds a key, since when, and its fencing token'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -f -a "dev-agent" -d 'Start a single-node, in-memory Consul-compatible server for trying the tool and for tests'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -f -a "demo" -d 'Show a leader, a standby and a handover in a few seconds, against a throwaway dev agent'
complete -c consul-leader -n "__fish_consul_leader_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l key -d 'The Consul KV key to lock, for example `jobs/report`; on etcd, the lock\'s name, as in `etcdctl lock NAME` (its keys are NAME/<lease id>)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l limit -d 'Let at most N holders run at once (a semaphore, the layout of `consul lock -n N`): KEY is then a prefix, holding KEY/.lock and one key per contender. 1 is the lock on KEY itself' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l ttl -d 'Session TTL: how long Consul keeps the session without a renew (it really waits 2x)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l lock-delay -d 'Lock-delay: after this session is invalidated, Consul refuses the key to others this long' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l silence -d 'Minimum gap between the previous leader\'s end and our command\'s start (skipped after a clean release)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l grace -d 'Time between the stop signal and SIGKILL' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l stop-signal -d 'Signal that asks the command to stop, by name (TERM, INT, HUP, QUIT, USR1, ...) or number' -r -f -a "TERM\t''
INT\t''
HUP\t''
QUIT\t''
USR1\t''
USR2\t''
WINCH\t''
ALRM\t''
PWR\t''
CONT\t''"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l wait -d 'How long to try for the lock before giving up with the busy exit code; 0 tries once. Default: wait for ever' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l check -d 'Bind this Consul check to the session (repeatable); when it goes critical, leadership ends' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l on-lost -d 'What to do when leadership is lost while the command runs' -r -f -a "exit\t'Stop the command and exit with the lost exit code'
recontend\t'Stop the command and contend for the lock again'"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l busy-exit-code -d 'Exit code when the lock was not won within --wait (change it when the command\'s own codes include 75)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l lost-exit-code -d 'Exit code when leadership was lost while the command ran (change it when the command\'s own codes include 76)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l id -d 'This contender\'s stable identity, written into the key\'s value; it survives a restart of the wrapper (default: the host name)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l priority-window -d 'After the last holder lost the lock to a fault (no clean release), other contenders wait this long, from when they first see the key free, before they try for it, so that the previous holder (same --id) gets it back first. 0 turns priority off' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l restart -d 'Restart the command while holding the lock: no (its exit ends the term), on-failure (after a non-zero exit or a death by signal), always' -r -f -a "no\t'The command\'s exit ends the term: release the lock, exit with its code'
on-failure\t'Restart after a non-zero exit or a death by signal'
always\t'Restart after any exit'"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l restart-delay -d 'First pause before a restart; it doubles with each restart in a row, up to 1 minute (or this value, if larger)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l restart-limit -d 'At most N starts of the command within PERIOD (e.g. 5/10m); past it, step down: stop, release the lock clean so another host can take over, and exit with the command\'s last exit code' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l forward-signals -d 'Signals forwarded to the command\'s process group instead of being acted on, comma separated: any of HUP, QUIT, USR1, USR2, WINCH, ALRM. TERM and INT always stop the command; HUP and QUIT do unless forwarded. Default: USR1,USR2,WINCH, less the --stop-signal' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l name -d 'Session name shown in Consul (default: consul-leader <key> on <host> pid <pid>)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l log-format -d 'Log line format on stderr' -r -f -a "text\t''
json\t''"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l http-addr -d 'Consul agent address: host:port, http://host:port, https://host:port or unix:///path [env: CONSUL_HTTP_ADDR] [default: 127.0.0.1:8500]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l token -d 'ACL token (prefer --token-file: a token on the command line is visible in ps). Precedence, as in Consul\'s CLI: --token-file, --token, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l token-file -d 'File holding the ACL token [env: CONSUL_HTTP_TOKEN_FILE]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l datacenter -d 'Datacenter to use instead of the agent\'s own (sent as ?dc=)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l ca-file -d 'CA certificate file (PEM) to verify the agent\'s TLS certificate with [env: CONSUL_CACERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l ca-path -d 'Directory of CA certificates (PEM) to verify the agent\'s TLS certificate with [env: CONSUL_CAPATH]' -r -f -a "(__fish_complete_directories)"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l client-cert -d 'Client certificate (PEM) for agents that require TLS client authentication [env: CONSUL_CLIENT_CERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l client-key -d 'Private key (PEM) of the client certificate [env: CONSUL_CLIENT_KEY]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l tls-server-name -d 'Name to verify the agent\'s certificate against (and send as SNI), if not the address\'s host [env: CONSUL_TLS_SERVER_NAME]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l namespace -d 'Enterprise namespace (sent as ?ns=); Consul CE refuses it [env: CONSUL_NAMESPACE]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l partition -d 'Enterprise admin partition (sent as ?partition=); Consul CE refuses it [env: CONSUL_PARTITION]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-endpoints -d 'Use etcd at these endpoints instead of Consul: comma-separated URLs (http://host:2379, https://..., or host:port) [env: ETCDCTL_ENDPOINTS]. Engine: a flag of one engine wins over the other\'s variables; flags of both, or ETCDCTL_ENDPOINTS and CONSUL_HTTP_ADDR both set without a flag, are refused (exit 2); nothing set means Consul' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-cacert -d 'CA certificate (PEM) to verify etcd\'s TLS certificates with [env: ETCDCTL_CACERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-cert -d 'Client certificate (PEM) for etcd\'s TLS client authentication [env: ETCDCTL_CERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-key -d 'Private key (PEM) of --etcd-cert [env: ETCDCTL_KEY]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-user -d 'etcd user, NAME or NAME:PASSWORD [env: ETCDCTL_USER]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l etcd-password -d 'Password of --etcd-user (prefer ETCDCTL_PASSWORD: a password on the command line is visible in ps) [env: ETCDCTL_PASSWORD]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l shell -d 'Run the command through `sh -c` (one string) instead of executing it directly'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -l no-node-check -d 'Do not bind the node\'s serfHealth check to the session'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -s q -l quiet -d 'Only print errors'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -s v -l verbose -d 'Also print debug lines (each renew, session IDs, forwarded signals)'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand run" -s V -l version -d 'Print version'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l key -d 'The Consul KV key to inspect, or the prefix of a semaphore (`run --limit N`, `consul lock -n N`): then its limit, holders and free slots. On etcd, the lock\'s name (as in `etcdctl lock NAME`)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l http-addr -d 'Consul agent address: host:port, http://host:port, https://host:port or unix:///path [env: CONSUL_HTTP_ADDR] [default: 127.0.0.1:8500]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l token -d 'ACL token (prefer --token-file: a token on the command line is visible in ps). Precedence, as in Consul\'s CLI: --token-file, --token, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l token-file -d 'File holding the ACL token [env: CONSUL_HTTP_TOKEN_FILE]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l datacenter -d 'Datacenter to use instead of the agent\'s own (sent as ?dc=)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l ca-file -d 'CA certificate file (PEM) to verify the agent\'s TLS certificate with [env: CONSUL_CACERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l ca-path -d 'Directory of CA certificates (PEM) to verify the agent\'s TLS certificate with [env: CONSUL_CAPATH]' -r -f -a "(__fish_complete_directories)"
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l client-cert -d 'Client certificate (PEM) for agents that require TLS client authentication [env: CONSUL_CLIENT_CERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l client-key -d 'Private key (PEM) of the client certificate [env: CONSUL_CLIENT_KEY]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l tls-server-name -d 'Name to verify the agent\'s certificate against (and send as SNI), if not the address\'s host [env: CONSUL_TLS_SERVER_NAME]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l namespace -d 'Enterprise namespace (sent as ?ns=); Consul CE refuses it [env: CONSUL_NAMESPACE]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l partition -d 'Enterprise admin partition (sent as ?partition=); Consul CE refuses it [env: CONSUL_PARTITION]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-endpoints -d 'Use etcd at these endpoints instead of Consul: comma-separated URLs (http://host:2379, https://..., or host:port) [env: ETCDCTL_ENDPOINTS]. Engine: a flag of one engine wins over the other\'s variables; flags of both, or ETCDCTL_ENDPOINTS and CONSUL_HTTP_ADDR both set without a flag, are refused (exit 2); nothing set means Consul' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-cacert -d 'CA certificate (PEM) to verify etcd\'s TLS certificates with [env: ETCDCTL_CACERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-cert -d 'Client certificate (PEM) for etcd\'s TLS client authentication [env: ETCDCTL_CERT]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-key -d 'Private key (PEM) of --etcd-cert [env: ETCDCTL_KEY]' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-user -d 'etcd user, NAME or NAME:PASSWORD [env: ETCDCTL_USER]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l etcd-password -d 'Password of --etcd-user (prefer ETCDCTL_PASSWORD: a password on the command line is visible in ps) [env: ETCDCTL_PASSWORD]' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -l json -d 'Print one JSON object instead of text'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -s h -l help -d 'Print help'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand status" -s V -l version -d 'Print version'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l listen -d 'Address to listen on: ip:port (port 0 picks a free port) or unix:///path/to.sock' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l tls-cert -d 'Serve HTTPS with this certificate chain (PEM, leaf first) instead of plain HTTP' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l tls-key -d 'Private key (PEM) of --tls-cert' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l tls-client-ca -d 'Require a client certificate signed by this CA (PEM) on every connection (mutual TLS)' -r -F
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l node -d 'Node name (default: the host name)' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l datacenter -d 'Datacenter name' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l session-ttl-min -d 'Smallest session TTL accepted (Consul\'s session_ttl_min); tests lower it' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l commit-latency -d 'Delay every write that Consul commits through Raft (KV writes, session create and destroy) by this long before it is applied, so that a read sent at the same time answers first, as it can with a real cluster. Zero (the default) applies writes at once' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -l acl-token -d 'Require this ACL token on every request; others get 403 Permission denied' -r
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -s h -l help -d 'Print help'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand dev-agent" -s V -l version -d 'Print version'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand demo" -s h -l help -d 'Print help'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand demo" -s V -l version -d 'Print version'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand help; and not __fish_seen_subcommand_from run status dev-agent demo" -f -a "run" -d 'Win the lock on a key, run a command while it is held, stop it when leadership ends'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand help; and not __fish_seen_subcommand_from run status dev-agent demo" -f -a "status" -d 'Show who holds a key, since when, and its fencing token'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand help; and not __fish_seen_subcommand_from run status dev-agent demo" -f -a "dev-agent" -d 'Start a single-node, in-memory Consul-compatible server for trying the tool and for tests'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand help; and not __fish_seen_subcommand_from run status dev-agent demo" -f -a "demo" -d 'Show a leader, a standby and a handover in a few seconds, against a throwaway dev agent'
complete -c consul-leader -n "__fish_consul_leader_using_subcommand help; and not __fish_seen_subcommand_from run status dev-agent demo" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
