# The api slot nginx sends requests to, for scripts that ask the api themselves
# (monitor-check.sh, monitor-watch.sh): sent before them by slots.with_live_slot.
# The rule of fabfile/core/slots.py (Layout.answering): the slot the include's first
# `server 127.0.0.1:PORT;` line names; slot a when there is no include yet (a host
# from before slots) or it names neither slot. POSIX sh, builtins only.
#   live_slot INCLUDE PORT_B URL_A URL_B
# sets live_name (a | b) and live_url (that slot's /health URL).
live_slot() {
    live_name=a live_url=$3
    [ -r "$1" ] || return 0
    while read -r _word _address _rest; do
        [ "$_word" = server ] || continue
        if [ "${_address%;}" = "127.0.0.1:$2" ]; then live_name=b live_url=$4; fi
        return 0
    done < "$1"
    return 0
}
