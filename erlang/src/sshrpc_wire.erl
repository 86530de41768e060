%% @doc Bytes <-> frames <-> terms for PROTOCOL.md v1, shared by the server
%% (sshrpc_server) and the client (sshrpc_client). No processes, no I/O.
%%
%% A frame is a 4-byte big-endian length and one External Term Format
%% payload. `take/2' cuts complete frames off a buffer and checks each length
%% against the receiver's max_frame before the payload is buffered.
%% `decode/2' turns a payload into a term with binary_to_term(B, [safe]) and,
%% when that fails, walks the payload to say what is wrong and at which byte
%% offset (PROTOCOL.md section 2).
-module(sshrpc_wire).

-export([frame/1, frame/2, encode/1, take/2, take_one/2, decode/2, decode_new_atoms/1,
         check/1, check/2, envelope/1]).
-export([buffer/0, buffer/1, buffer_add/2]).


-opaque buffer() :: {binary(), [binary()], non_neg_integer(), pos_integer()}.
-export_type([buffer/0]).

-type decode_opts() :: #{max := pos_integer(), new_atoms => non_neg_integer(),
                         stop_after => non_neg_integer() | infinity}.
-export_type([decode_opts/0]).

%% @doc The ETF payload of Term as OTP 26+ encodes it by default (UTF-8 atoms,
%% tag 70 floats).
-spec encode(term()) -> binary().
encode(Term) ->
    term_to_binary(Term, [{minor_version, 2}]).

%% @doc A whole frame (length prefix and payload) for Term.
-spec frame(term()) -> iodata().
frame(Term) ->
    B = encode(Term),
    [<<(byte_size(B)):32>>, B].

%% @doc Like frame/1, but refuses a payload larger than Max bytes.
-spec frame(term(), pos_integer()) -> {ok, iodata(), non_neg_integer()} | {too_large, non_neg_integer()}.
frame(Term, Max) ->
    B = encode(Term),
    case byte_size(B) of
        N when N > Max -> {too_large, N};
        N -> {ok, [<<N:32>>, B], N + 4}
    end.

%% @doc Cut the complete frames off Buf. Keepalives (length 0) are dropped.
%% Returns the payloads in order and the rest of the buffer, or the first
%% length that exceeds Max (the payload is never buffered then).
-spec take(binary(), pos_integer()) ->
    {[binary()], binary()} | {too_large, [binary()], non_neg_integer()}.
take(Buf, Max) ->
    take(Buf, Max, []).

%% A receive buffer: the bytes of an incomplete frame, kept as a list of
%% chunks until the frame is complete, and joined once. (Appending each SSH
%% packet to one binary that is also matched copies it every time: quadratic
%% for a 16 MiB frame.)

-spec buffer() -> buffer().
buffer() ->
    {<<>>, [], 0, 4}.

%% @doc A buffer holding Rest, the bytes left after take_one/2.
-spec buffer(binary()) -> buffer().
buffer(<<Len:32, _/binary>> = Rest) ->
    {Rest, [], byte_size(Rest), 4 + Len};
buffer(Rest) ->
    {Rest, [], byte_size(Rest), 4}.

%% @doc Add received bytes. {ready, Bin} when Bin may hold a whole frame (or
%% at least its length); then cut frames with take_one/2 and make a new
%% buffer from the rest with buffer/1.
-spec buffer_add(binary(), buffer()) -> {ready, binary()} | {wait, buffer()}.
buffer_add(Data, {Bin, Rev, Size, Need}) ->
    case Size + byte_size(Data) of
        S when S < Need -> {wait, {Bin, [Data | Rev], S, Need}};
        _ -> {ready, iolist_to_binary([Bin | lists:reverse([Data | Rev])])}
    end.

%% @doc Cut one complete frame off Buf (keepalives are skipped).
-spec take_one(binary(), pos_integer()) ->
    {frame, binary(), binary()} | {more, binary()} | {too_large, non_neg_integer()}.
take_one(<<0:32, Rest/binary>>, Max) ->
    take_one(Rest, Max);
take_one(<<Len:32, _/binary>>, Max) when Len > Max ->
    {too_large, Len};
take_one(<<Len:32, Payload:Len/binary, Rest/binary>>, _Max) ->
    {frame, Payload, Rest};
take_one(Rest, _Max) ->
    {more, Rest}.

take(<<0:32, Rest/binary>>, Max, Acc) ->
    take(Rest, Max, Acc);
take(<<Len:32, _/binary>>, Max, Acc) when Len > Max ->
    {too_large, lists:reverse(Acc), Len};
take(<<Len:32, Payload:Len/binary, Rest/binary>>, Max, Acc) ->
    take(Rest, Max, [Payload | Acc]);
take(Rest, _Max, Acc) ->
    {lists:reverse(Acc), Rest}.

%% @doc Decode one payload.
%%
%% A payload that binary_to_term(B, [safe]) accepts decodes at once. One
%% whose only fault is atoms this node does not know yet (or external funs,
%% `fun M:F/A', whose export entries are not collected either) is walked
%% first, without creating anything, and the distinct unknown atoms counted:
%% - with #{new_atoms => Budget}, up to Budget of them are accepted and the
%%   payload decoded ({ok, Term, Count}); the client uses this for the atoms
%%   in a server's answers;
%% - otherwise (or beyond Budget) the answer is {new_atoms, Count, Detail}:
%%   nothing was created; the caller charges Count to its budgets and calls
%%   decode_new_atoms/1 if they allow it (the server does this).
%% With #{stop_after => L} the walk stops at the (L+1)th unknown atom (the
%% caller could not accept more anyway): Count is then L + 1, "more than L",
%% and a refused frame costs the walk of at most L + 1 unknown atoms.
-spec decode(binary(), decode_opts()) ->
    {ok, term(), non_neg_integer()} | {error, binary()} | {inflate_too_large, non_neg_integer()}
    | {new_atoms, pos_integer(), binary()}.
decode(<<131, 80, Size:32, _/binary>>, #{max := Max}) when Size > Max ->
    {inflate_too_large, Size};
decode(Payload, Opts) ->
    try binary_to_term(Payload, [safe, used]) of
        {Term, Used} when Used =:= byte_size(Payload) -> {ok, Term, 0};
        {_, Used} -> {error, detail(<<"trailing bytes after the term">>, Used)}
    catch
        error:badarg -> decode_unsafe(Payload, Opts)
    end.

decode_unsafe(<<131, 80, Size:32, Z/binary>> = Payload, Opts) ->
    %% Compressed (Size is at most max, checked above): inflate at most Size
    %% bytes and look at the term inside.
    case inflate(Z, Size) of
        {ok, Raw} ->
            case decode_unsafe(<<131, Raw/binary>>, Opts#{new_atoms => 0}) of
                {new_atoms, N, Detail} ->
                    case N =< maps:get(new_atoms, Opts, 0) of
                        true ->
                            case decode_new_atoms(Payload) of
                                {ok, Term} -> {ok, Term, N};
                                Error -> Error
                            end;
                        false ->
                            {new_atoms, N, Detail}
                    end;
                Other ->
                    Other
            end;
        error ->
            {error, detail(<<"invalid compressed term">>, 0)}
    end;
decode_unsafe(Payload, Opts) ->
    Budget = maps:get(new_atoms, Opts, 0),
    StopAfter = case maps:get(stop_after, Opts, infinity) of
                    infinity -> infinity;
                    S -> max(S, Budget)
                end,
    case check(Payload, StopAfter) of
        {ok, NewAtoms, _} when NewAtoms > 0, NewAtoms =< Budget ->
            case decode_new_atoms(Payload) of
                {ok, Term} -> {ok, Term, NewAtoms};
                Error -> Error
            end;
        {ok, NewAtoms, {Offset, Text}} when NewAtoms > 0 ->
            Count = case NewAtoms > StopAfter of
                        true -> io_lib:format("more than ~b", [StopAfter]);
                        false -> integer_to_list(NewAtoms)
                    end,
            {new_atoms, NewAtoms, detail(iolist_to_binary(io_lib:format(
                "~s atoms unknown to this node, the first '~ts'", [Count, Text])), Offset)};
        {ok, NewAtoms, none} when NewAtoms > 0 ->
            {new_atoms, NewAtoms, detail(iolist_to_binary(io_lib:format(
                "~b external funs", [NewAtoms])), 0)};
        {ok, 0, _} ->
            {error, detail(<<"term refused by binary_to_term(B, [safe])">>, 0)};
        {error, What, Offset} ->
            {error, detail(What, Offset)}
    end.

%% zlib data that inflates to exactly Size bytes, never inflating more.
inflate(Z, Size) ->
    S = zlib:open(),
    try
        ok = zlib:inflateInit(S),
        inflate_loop(S, zlib:safeInflate(S, Z), Size, [], 0)
    catch
        _:_ -> error
    after
        zlib:close(S)
    end.

inflate_loop(S, {continue, Out}, Size, Acc, N) ->
    case N + iolist_size(Out) of
        N1 when N1 > Size -> error;
        N1 -> inflate_loop(S, zlib:safeInflate(S, []), Size, [Out | Acc], N1)
    end;
inflate_loop(_S, {finished, Out}, Size, Acc, N) ->
    case N + iolist_size(Out) of
        Size -> {ok, iolist_to_binary(lists:reverse([Out | Acc]))};
        _ -> error
    end;
inflate_loop(_S, _, _Size, _Acc, _N) ->
    error.

%% @doc Decode a payload for which decode/2 answered {new_atoms, N, _}, once
%% the caller has accepted N new atoms: this creates them.
-spec decode_new_atoms(binary()) -> {ok, term()} | {error, binary()}.
decode_new_atoms(Payload) ->
    try binary_to_term(Payload, [used]) of
        {Term, Used} when Used =:= byte_size(Payload) -> {ok, Term};
        {_, Used} -> {error, detail(<<"trailing bytes after the term">>, Used)}
    catch
        error:badarg -> {error, detail(<<"invalid term">>, 0)}
    end.

%% @doc The start of a request, read without decoding it (for a payload that
%% cannot be decoded now): its tag, if it is an atom this node knows, the
%% second element if it is an integer (the id of call, spawn, cancel and
%% credit), and the bytes after the tag. `unknown' where a part cannot be read.
-spec envelope(binary()) ->
    {atom(), pos_integer(), integer() | unknown, binary()} | unknown.
envelope(<<131, 104, Arity, Rest/binary>>) when Arity >= 1 ->
    envelope_tag(Arity, Rest);
envelope(<<131, 105, Arity:32, Rest/binary>>) when Arity >= 1 ->
    envelope_tag(Arity, Rest);
envelope(_) ->
    unknown.

envelope_tag(Arity, Bin) ->
    Parsed = case Bin of
                 <<118, L:16, T:L/binary, R/binary>> -> {T, utf8, R};
                 <<119, L, T:L/binary, R/binary>> -> {T, utf8, R};
                 <<100, L:16, T:L/binary, R/binary>> -> {T, latin1, R};
                 <<115, L, T:L/binary, R/binary>> -> {T, latin1, R};
                 _ -> unknown
             end,
    case Parsed of
        unknown -> unknown;
        {Text, Enc, Rest} ->
            try binary_to_existing_atom(Text, Enc) of
                Tag when Arity >= 2 -> {Tag, Arity, envelope_int(Rest), Rest};
                Tag -> {Tag, Arity, unknown, Rest}
            catch
                error:badarg -> unknown
            end
    end.

envelope_int(<<97, I, _/binary>>) -> I;
envelope_int(<<98, I:32/signed, _/binary>>) -> I;
envelope_int(<<110, N, Sign, Digits:N/binary, _/binary>>) ->
    I = binary:decode_unsigned(Digits, little),
    case Sign of 0 -> I; _ -> -I end;
envelope_int(_) -> unknown.

detail(What, Offset) ->
    iolist_to_binary([What, io_lib:format(" at byte ~b", [Offset])]).

%% @doc Walk an ETF payload without building it. Returns how many distinct
%% atoms in it are unknown to this node (plus one per external fun,
%% `fun M:F/A', whose export entry is never collected either), or what is
%% wrong and where. Unknown atoms are not an error here: decode/2 decides.
-spec check(binary()) ->
    {ok, non_neg_integer(), none | {non_neg_integer(), binary()}}
    | {error, binary(), non_neg_integer()}.
check(Payload) ->
    check(Payload, infinity).

%% @doc As check/1, but stops at the (StopAfter+1)th unknown atom and answers
%% {ok, StopAfter + 1, First}: the rest of the payload is not looked at.
-spec check(binary(), non_neg_integer() | infinity) ->
    {ok, non_neg_integer(), none | {non_neg_integer(), binary()}}
    | {error, binary(), non_neg_integer()}.
check(<<131, 80, _:32, _/binary>>, _) ->
    %% Compressed: binary_to_term already rejected it; report it as a whole.
    {error, <<"invalid compressed term">>, 0};
check(<<131, Rest/binary>> = Payload, StopAfter) ->
    erase(sshrpc_first_unknown_atom),
    put(sshrpc_unknown_atoms, #{}),
    put(sshrpc_stop_after, StopAfter),
    try walk(Rest, 1, 0, byte_size(Payload)) of
        {<<>>, New} ->
            case erase(sshrpc_first_unknown_atom) of
                undefined -> {ok, New, none};
                First -> {ok, New, First}
            end;
        {R, _} ->
            {error, <<"trailing bytes after the term">>, byte_size(Payload) - byte_size(R)}
    catch
        throw:{bad, What, Off} -> {error, What, Off};
        throw:{stop_after, N} -> {ok, N, erase(sshrpc_first_unknown_atom)}
    after
        erase(sshrpc_unknown_atoms),
        erase(sshrpc_stop_after)
    end;
check(<<>>, _) ->
    {error, <<"empty payload">>, 0};
check(_, _) ->
    {error, <<"payload does not start with version byte 131">>, 0}.

bad(What, Off) -> throw({bad, What, Off}).

%% walk(Bytes, K, NewAtoms, Total) -> {Rest, NewAtoms}: skip K terms.
%%
%% One flat loop, no recursion: a container adds its elements to K, the
%% number of terms still to skip, so nesting costs nothing and the binary
%% match context is reused from term to term (tens of nanoseconds a term).
%% Offsets in errors are Total - byte_size(Rest).
walk(R, 0, N, _T) -> {R, N};
walk(<<97, _, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<98, _:32, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<70, _:64, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<106, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<104, A, R/binary>>, K, N, T) -> walk(R, K - 1 + A, N, T);
walk(<<105, A:32, R/binary>>, K, N, T) -> walk(R, K - 1 + A, N, T);
walk(<<116, A:32, R/binary>>, K, N, T) -> walk(R, K - 1 + 2 * A, N, T);
walk(<<108, L:32, R/binary>>, K, N, T) -> walk(R, K + L, N, T);  %% L elements and a tail
walk(<<107, L:16, _:L/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<109, L:32, _:L/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<77, L:32, _, _:L/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<110, L, _, _:L/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<111, L:32, _, _:L/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<99, _:31/binary, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<119, L, Text:L/binary, R/binary>> = B, K, N, T) ->
    walk(R, K - 1, atom(Text, utf8, N, T - byte_size(B)), T);
walk(<<118, L:16, Text:L/binary, R/binary>> = B, K, N, T) ->
    walk(R, K - 1, atom(Text, utf8, N, T - byte_size(B)), T);
walk(<<115, L, Text:L/binary, R/binary>> = B, K, N, T) ->
    walk(R, K - 1, atom(Text, latin1, N, T - byte_size(B)), T);
walk(<<100, L:16, Text:L/binary, R/binary>> = B, K, N, T) ->
    walk(R, K - 1, atom(Text, latin1, N, T - byte_size(B)), T);
%% ATOM_INTERNAL_REF2/3: an atom by its index in this node's table (which
%% binary_to_term accepts): it exists already.
walk(<<73, _:16, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
walk(<<75, _:24, R/binary>>, K, N, T) -> walk(R, K - 1, N, T);
%% fun M:F/A: three terms, and an export entry that is never collected.
walk(<<113, R/binary>>, K, N, T) -> walk(R, K + 2, N + 1, T);
%% A local fun: fixed fields, then module, old index, old uniq, pid and the
%% free variables, all terms.
walk(<<112, _Size:32, _Arity, _Uniq:16/binary, _Index:32, Free:32, R/binary>>, K, N, T) ->
    walk(R, K + 3 + Free, N, T);
%% Pids, ports and references: a node atom, then fixed bytes.
walk(<<88, R/binary>> = B, K, N, T) -> node_then(R, 12, K, N, T, B);
walk(<<103, R/binary>> = B, K, N, T) -> node_then(R, 9, K, N, T, B);
walk(<<89, R/binary>> = B, K, N, T) -> node_then(R, 8, K, N, T, B);
walk(<<120, R/binary>> = B, K, N, T) -> node_then(R, 12, K, N, T, B);
walk(<<102, R/binary>> = B, K, N, T) -> node_then(R, 5, K, N, T, B);
walk(<<101, R/binary>> = B, K, N, T) -> node_then(R, 5, K, N, T, B);
walk(<<90, L:16, R/binary>> = B, K, N, T) -> node_then(R, 4 + 4 * L, K, N, T, B);
walk(<<114, L:16, R/binary>> = B, K, N, T) -> node_then(R, 1 + 4 * L, K, N, T, B);
walk(<<>>, _K, _N, T) ->
    bad(<<"truncated term">>, T);
walk(<<Tag, _/binary>> = B, _K, _N, T) ->
    case lists:member(Tag, [97, 98, 70, 104, 105, 116, 108, 107, 109, 77, 110, 111, 99, 119,
                            118, 115, 100, 112, 88, 103, 89, 120, 102, 101, 90, 114, 73, 75]) of
        true -> bad(<<"truncated term">>, T);
        false -> bad(iolist_to_binary(io_lib:format("unknown tag ~b", [Tag])), T - byte_size(B))
    end.

%% Count an atom if this node does not know it (each distinct text once).
atom(Text, Enc, N, Off) ->
    Known =
        try binary_to_existing_atom(Text, Enc) of
            _ -> true
        catch
            error:badarg ->
                case Enc =:= utf8 andalso unicode:characters_to_list(Text, utf8) of
                    L2 when is_list(L2), length(L2) =< 255 -> false;
                    false when byte_size(Text) =< 255 -> false;
                    _ -> bad(<<"invalid atom text">>, Off)
                end
        end,
    Seen = get(sshrpc_unknown_atoms),
    Key = case Enc of
              utf8 -> Text;
              latin1 -> unicode:characters_to_binary(Text, latin1, utf8)
          end,
    case Known orelse is_map_key(Key, Seen) of
        true ->
            N;
        false ->
            map_size(Seen) > 0 orelse put(sshrpc_first_unknown_atom, {Off, Text}),
            put(sshrpc_unknown_atoms, Seen#{Key => true}),
            N1 = N + 1,
            N1 > get(sshrpc_stop_after) andalso throw({stop_after, N1}),
            N1
    end.

%% A pid, port or reference: its node atom, then Len fixed bytes.
node_then(<<Tag, _/binary>> = R, Len, K, N, T, _B) when Tag =:= 100; Tag =:= 115;
                                                         Tag =:= 118; Tag =:= 119 ->
    {R1, N1} = walk(R, 1, N, T),
    case R1 of
        <<_:Len/binary, R2/binary>> -> walk(R2, K - 1, N1, T);
        _ -> bad(<<"truncated term">>, T)
    end;
node_then(<<>>, _Len, _K, _N, T, _B) ->
    bad(<<"truncated term">>, T);
node_then(_R, _Len, _K, _N, T, B) ->
    bad(<<"a pid, port or reference without a node atom">>, T - byte_size(B)).
