"""Result destinations: where a function's result goes (bus topic, Zaqar, HTTP callback, dead letter)."""
