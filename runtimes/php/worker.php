<?php
// Headwater PHP worker: loads one function's file once, then serves requests from the runtime server.
//
// Started by runtimes/php/server.py in a child the shared server has already contained (sandbox uid,
// rlimits, clean environment, cwd = the unpacked package): `php worker.php <file.function>`.
// Requests arrive on fd 3 and results leave on fd 4, each an 8-byte big-endian length and JSON
// (runtimes/README.md); the function's stdout/stderr are the execution's logs.

declare(strict_types=1);

$HW_ME = posix_getpid();          // a process the function forks has another pid: it never answers
$HW_REQUESTS = fopen('php://fd/3', 'rb');
$HW_RESULTS = fopen('php://fd/4', 'wb');
$HW_BUSY = false;                 // a request is running: a fatal error must still answer it
$HW_PKG = getcwd() . '/';

// A file bigger than the file size limit fails the write (EFBIG) instead of killing the process.
pcntl_signal(SIGXFSZ, SIG_IGN);

// Warnings (fopen on too many files, a failed fork) become exceptions the function can catch and
// the runtime can classify, as in the other languages.
set_error_handler(function (int $severity, string $message, string $file = '', int $line = 0): bool {
    if (!(error_reporting() & $severity)) {
        return false;
    }
    throw new ErrorException($message, 0, $severity, $file, $line);
});

function hw_send(array $result): void
{
    global $HW_RESULTS;
    $payload = json_encode($result, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION
        | JSON_INVALID_UTF8_SUBSTITUTE);
    fwrite($HW_RESULTS, pack('J', strlen($payload)) . $payload);
    fflush($HW_RESULTS);
}

function hw_read(int $n): ?string
{
    global $HW_REQUESTS;
    $data = '';
    while (strlen($data) < $n) {
        $chunk = fread($HW_REQUESTS, $n - strlen($data));
        if ($chunk === false || $chunk === '') {
            return null;
        }
        $data .= $chunk;
    }
    return $data;
}

function hw_relative(string $text): string
{
    global $HW_PKG;
    return str_replace([$HW_PKG, '/proc/self/fd/5'], ['', 'worker.php'], $text);
}

// An uncaught Throwable as PHP prints it, paths relative to the package, without the worker's frames.
function hw_log_throwable(Throwable $e): void
{
    $lines = [];
    foreach (explode("\n", $e->getTraceAsString()) as $line) {
        if (!str_contains($line, 'worker.php') && !str_contains($line, '/proc/self/fd/5') && !str_contains($line, 'hw_call(')) {
            $lines[] = $line;
        }
    }
    fwrite(STDERR, hw_relative(sprintf("PHP Fatal error:  Uncaught %s: %s in %s:%d\nStack trace:\n%s\n",
        get_class($e), $e->getMessage(), $e->getFile(), $e->getLine(), implode("\n", $lines))));
}

function hw_reason(string $message): string
{
    if (preg_match('/Too many open files|File too large|errno=27\b/i', $message)) {
        return 'files';
    }
    if (preg_match('/Resource temporarily unavailable|\bError 11\b|EAGAIN/', $message)) {
        return 'processes';
    }
    if (preg_match('/Allowed memory size of \d+ bytes exhausted|Out of memory/', $message)) {
        return 'memory';
    }
    return 'error';
}

function hw_leftovers(): bool
{
    // This worker is its processes' subreaper (set before exec): a child still running after the
    // call means the function left something behind, and the server recycles this worker.
    while (true) {
        $pid = pcntl_waitpid(-1, $status, WNOHANG);
        if ($pid === 0) {
            return true;
        }
        if ($pid < 0) {
            return false;
        }
    }
}

// A fatal error (memory_limit, exit(), a type error in the engine) ends the script: answer the
// running request from the shutdown function, and let the server start a fresh worker.
register_shutdown_function(function (): void {
    global $HW_BUSY, $HW_ME;
    if (!$HW_BUSY || posix_getpid() !== $HW_ME) {
        return;
    }
    $error = error_get_last();
    if ($error !== null && in_array($error['type'], [E_ERROR, E_CORE_ERROR, E_COMPILE_ERROR, E_USER_ERROR, E_PARSE], true)) {
        fwrite(STDERR, hw_relative(sprintf("PHP Fatal error:  %s in %s on line %d\n", $error['message'], $error['file'], $error['line'])));
        $reason = hw_reason($error['message']);
        $output = $reason === 'memory' ? 'Function exceeded its memory limit.' : hw_relative($error['message']);
    } else {
        $reason = 'error';
        $output = 'Function called exit().';
    }
    hw_send(['status' => 'failed', 'reason' => $reason, 'output' => $output, 'recycle' => true]);
});

// Load the entry's file once: `file.function` → ./file.php, function `function`.
$entry = $argv[1] ?? 'main.main';
$dot = strrpos($entry, '.');
$loadError = null;
$function = null;
if ($dot === false || $dot === 0 || $dot === strlen($entry) - 1) {
    $loadError = "Invalid entry '$entry': expected 'file.function'.";
} else {
    $file = substr($entry, 0, $dot);
    $name = substr($entry, $dot + 1);
    $path = str_replace('.', '/', $file) . '.php';
    if (str_contains($file, '..') || !is_file($path)) {
        $loadError = "Failed to load file '$path': no such file in the package.";
    } else {
        try {
            (static function (string $path): void {
                require_once $path;
            })($path);
            if (!function_exists($name)) {
                $loadError = "File '$path' has no function '$name'.";
            } else {
                $function = $name;
            }
        } catch (Throwable $e) {
            hw_log_throwable($e);
            $loadError = "Failed to load file '$path': " . $e->getMessage();
        }
    }
}

function hw_call(string $function, array $request): array
{
    global $HW_ME;
    $input = $request['input'] ?? null;
    $context = $request['context'] ?? [];
    try {
        $output = $function($input, $context);
    } catch (Throwable $e) {
        if (posix_getpid() !== $HW_ME) {
            exit(1);  // a forked copy of the function: no answer, no trace
        }
        hw_log_throwable($e);
        $reason = hw_reason($e->getMessage());
        $message = $e->getMessage() === '' ? get_class($e) : hw_relative($e->getMessage());
        if ($reason === 'processes') {
            $message = "Function reached its process limit: $message";
        }
        return ['status' => 'failed', 'reason' => $reason, 'output' => $message];
    }
    if (posix_getpid() !== $HW_ME) {
        exit(0);
    }
    try {
        json_encode($output, JSON_THROW_ON_ERROR | JSON_PRESERVE_ZERO_FRACTION);
    } catch (Throwable $e) {
        $message = sprintf('Function returned a value that is not JSON serialisable (%s): %s', get_debug_type($output), $e->getMessage());
        fwrite(STDERR, $message . "\n");
        return ['status' => 'failed', 'reason' => 'error', 'output' => $message];
    }
    return ['status' => 'success', 'reason' => 'ok', 'output' => $output];
}

while (true) {
    $head = hw_read(8);
    if ($head === null) {
        break;  // the server retired this worker, or died
    }
    $size = unpack('J', $head)[1];
    $body = hw_read($size);
    if ($body === null) {
        break;
    }
    $request = json_decode($body, true, 512, JSON_BIGINT_AS_STRING) ?? [];
    if ($loadError !== null) {
        hw_send(['status' => 'failed', 'reason' => 'error', 'output' => $loadError, 'recycle' => true]);
        break;  // load again in a fresh worker next time: the cause may have been transient
    }
    $HW_BUSY = true;
    $result = hw_call($function, $request);
    $HW_BUSY = false;
    if (hw_leftovers()) {
        $result['leftovers'] = true;
    }
    hw_send($result);
}
